"""Layers (``--layers``), the EfficientNet-Lite ladder, timm:NAME backbones and ``choose``."""

import dataclasses
import json
import shlex

import numpy as np
import pytest
import torch
from conftest import make_dataset
from torchvision.models import MobileNet_V2_Weights

from featcache.backbones import BackboneIdentity, Preprocessing, get_entry
from featcache.backbones.build import build_backbone
from featcache.backbones.eager import pooled
from featcache.backbones.normalize import normalize
from featcache.backbones.weights import WeightsUnavailableError
from featcache.cache import read_cache
from featcache.choose import Candidate, choose, sample
from featcache.cli import main
from featcache.dataset import scan
from featcache.errors import CacheMismatchError, FeatcacheError, FeatcacheWarning
from featcache.extract import extract
from featcache.images import load_pixels
from featcache.settings import RunOptions

IMAGENET = MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
TINY_TIMM = "test_convnext.r160_in1k"  # a 272k-parameter timm model made for tests


def run(*args: str) -> int:
    """Run the command line in this process; its exit status."""
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code


# ---- layers as data -------------------------------------------------------------------------


def test_layers_are_resolved_to_one_canonical_form():
    lite0 = get_entry("efficientnet_lite0")
    assert lite0.resolve_layers("last") == "last"
    assert lite0.resolve_layers("multi") == lite0.multi == "2,3,4,5,6,last"
    assert lite0.resolve_layers(" 6, last ,4") == "4,6,last"
    assert lite0.resolve_layers("2") == "2"
    assert lite0.pooled_dim("avg", "4,5,6,last") == 112 + 192 + 320 + 1280
    assert lite0.pooled_dim("avgmax", "4,last") == 2 * (112 + 1280)
    assert get_entry("efficientnet_lite2").pooled_dim("avg", "multi") == 48 + 88 + 120 + 208 + 352 + 1280


BAD_SPECS = [("7", "'7' is not a layer"), ("4,4,last", "listed twice"), ("", "'' is not a layer"),
             ("first", "'first' is not a layer")]  # fmt: skip


@pytest.mark.parametrize("spec, why", BAD_SPECS)
def test_a_bad_layers_spec_says_what_is_allowed(spec, why):
    with pytest.raises(ValueError, match=why) as e:
        get_entry("efficientnet_lite0").resolve_layers(spec)
    if "twice" not in why:
        assert "stage indices 0-6 (see 'featcache backbones --layers efficientnet_lite0')" in str(e.value)


def test_layers_are_part_of_the_identity():
    one = BackboneIdentity("efficientnet_lite0", "IMAGENET1K", "5" * 64, Preprocessing(), "avg", 1280)
    old = one.to_dict()
    del old["layers"]
    del old["preprocessing"]["crop_pct"]
    assert BackboneIdentity.from_dict(old) == one  # recorded before layers existed: the last layer
    multi = dataclasses.replace(one, layers="4,5,6,last", feature_dim=1904)
    assert BackboneIdentity.from_dict(multi.to_dict()) == multi
    assert ("layers", "last", "4,5,6,last") in one.differences(multi)


# ---- the features of the layers ---------------------------------------------------------------


def _stages_by_hand(model, x, indices):
    """timm's EfficientNet run block by block: each wanted block's output, average-pooled."""
    h = model.bn1(model.conv_stem(x))
    out = []
    for i, block in enumerate(model.blocks):
        h = block(h)
        if i in indices:
            out.append(h.mean(dim=(2, 3)))
    return out


@pytest.fixture(scope="module")
def lite0_plain():
    """Lite0 exactly as built (no folding), the reference for every engine."""
    return build_backbone("efficientnet_lite0", layers="multi", engine="torch", optimize=False)


@pytest.mark.parametrize("engine", ["torch", "openvino"])
def test_multi_features_are_the_separately_pooled_stages(lite0_plain, photo, rng, engine):
    pixels = np.stack([load_pixels(photo, lite0_plain.preprocessing), rng.integers(0, 256, (224, 224, 3))])
    pixels = pixels.astype(np.uint8)
    model = lite0_plain.model
    with torch.no_grad():
        x = normalize(pixels, lite0_plain.preprocessing)
        parts = _stages_by_hand(model, x, (2, 3, 4, 5, 6)) + [model.forward_features(x).mean(dim=(2, 3))]
    expected = torch.cat(parts, dim=1).numpy()
    np.testing.assert_array_equal(lite0_plain.embed(pixels), expected)  # same network: same numbers
    net = build_backbone("efficientnet_lite0", layers="multi", engine=engine)
    assert (
        net.engine == engine and net.identity.layers == "2,3,4,5,6,last" and net.identity.feature_dim == 2024
    )
    got = net.embed(pixels)
    assert got.shape == (2, 2024)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)  # BatchNorm folded: float rounding


def test_each_layer_is_pooled_as_asked(lite0_plain, photo):
    pixels = load_pixels(photo, lite0_plain.preprocessing)[None]
    both = build_backbone(
        "efficientnet_lite0", layers="5,last", pool="avgmax", engine="torch", optimize=False
    )
    with torch.no_grad():
        maps = both.layer_maps(normalize(pixels, both.preprocessing))
    assert [tuple(m.shape) for m in maps] == [(1, 192, 7, 7), (1, 1280, 7, 7)]
    expected = torch.cat([pooled(m, "avgmax") for m in maps], dim=1).numpy()
    np.testing.assert_array_equal(both.embed(pixels), expected)
    assert both.identity.feature_dim == 2 * (192 + 1280)
    avg = lite0_plain.embed(pixels)
    np.testing.assert_allclose(expected[:, :192], avg[:, 232:424], rtol=1e-6)  # after stages 2, 3, 4


def test_mobilenet_stages_are_the_papers(photo):
    with pytest.warns(FeatcacheWarning, match="random weights"):
        net = build_backbone("mobilenet_v2", weights="random", layers="0,1,2,3,4,5,6,last", engine="torch")
    with torch.no_grad():
        maps = net.layer_maps(normalize(load_pixels(photo, net.preprocessing)[None], net.preprocessing))
    shapes = [tuple(m.shape[1:]) for m in maps]
    assert shapes == [(16, 112, 112), (24, 56, 56), (32, 28, 28), (64, 14, 14), (96, 14, 14), (160, 7, 7),
                      (320, 7, 7), (1280, 7, 7)]  # fmt: skip


def test_a_cache_never_mixes_layers(tmp_path, dataset):
    out = tmp_path / "f.h5"
    extract(dataset, out, backbone="efficientnet_lite0", engine="torch")
    with pytest.raises(CacheMismatchError, match="layers: last vs 2,3,4,5,6,last"):
        extract(dataset, out, layers="multi", engine="torch")
    result = extract(
        dataset, out, backbone="efficientnet_lite0", layers="multi", engine="torch", overwrite=True
    )
    assert result.identity.layers == "2,3,4,5,6,last" and read_cache(out).features.shape[1] == 2024
    again = extract(dataset, out, engine="torch")  # the recorded layers, not the default
    assert again.n_computed == 0 and again.identity.layers == "2,3,4,5,6,last"


def test_info_and_backbones_show_the_layers(tmp_path, dataset, capsys):
    out = tmp_path / "f.h5"
    flags = ["--backbone", "efficientnet_lite0", "--layers", "5,6,last", "--engine", "torch", "-q"]
    assert run("extract", str(dataset), "-o", str(out), *flags) == 0
    assert "layers 5,6,last" in capsys.readouterr().out
    assert run("info", str(out)) == 0
    assert "1792-d, avg pooling of layers 5,6,last" in capsys.readouterr().out
    assert run("backbones", "--layers", "efficientnet_lite0") == 0
    listing = capsys.readouterr().out
    assert "      4  blocks.4            112  14x14" in listing
    assert "multi = 2,3,4,5,6,last: 2024 channels" in listing


def test_a_bad_layers_flag_is_one_line(tmp_path, dataset, capsys):
    assert run("extract", str(dataset), "-o", str(tmp_path / "f.h5"), "--backbone", "efficientnet_lite0",
               "--layers", "4,9") == 1  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: layers '4,9': '9' is not a layer of efficientnet_lite0") and "\n" not in err


# ---- the ladder -------------------------------------------------------------------------------


LADDER = [("efficientnet_lite1", 240, "77cc7160"), ("efficientnet_lite2", 260, "9656183e")]


@pytest.mark.parametrize("name, size, filename_prefix", LADDER)
def test_the_ladder_knows_espresso_and_cats(name, size, filename_prefix):
    skdata = pytest.importorskip("skimage.data")
    net = build_backbone(name, engine="torch", traced=False)
    assert net.identity.weights_sha256.startswith(filename_prefix) and net.preprocessing.size == size

    def top(image, k):
        p = net.imagenet_logits(load_pixels(image, net.preprocessing)[None]).softmax(1)[0]
        return [(IMAGENET[i], float(v)) for v, i in zip(*p.topk(k), strict=True)]

    coffee = top(skdata.coffee(), 1)
    assert coffee[0][0] == "espresso" and coffee[0][1] > 0.5, coffee
    assert CATS & {label for label, _ in top(skdata.chelsea(), 3)}


# ---- timm:NAME --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_timm(tmp_path_factory):
    """A timm test model with seeded random weights, saved as the Hub's safetensors file would be."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(TINY_TIMM).eval()
    path = tmp_path_factory.mktemp("timm") / "weights.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def test_timm_preprocessing_is_the_pretrained_configs(photo):
    timm = pytest.importorskip("timm")
    from PIL import Image

    entry = get_entry(f"timm:{TINY_TIMM}")
    p = entry.preprocessing
    assert (p.size, p.resize, p.interpolation, p.crop_pct, p.mean) == (160, "center_crop", "bicubic", 0.95,
                                                                       (0.5, 0.5, 0.5))  # fmt: skip
    config = timm.data.resolve_data_config({}, model=timm.create_model(TINY_TIMM))
    transform = timm.data.create_transform(**config)  # Resize, CenterCrop, ToTensor, Normalize
    image = Image.fromarray(photo)
    theirs = np.asarray(transform.transforms[1](transform.transforms[0](image)))
    np.testing.assert_array_equal(load_pixels(photo, p), theirs)


def test_timm_embedding_is_the_pooled_input_of_its_classifier(tiny_timm, photo):
    model, path = tiny_timm
    net = build_backbone(f"timm:{TINY_TIMM}", weights=str(path), engine="torch", optimize=False)
    assert net.identity.backbone == f"timm:{TINY_TIMM}" and net.identity.feature_dim == 64
    pixels = load_pixels(photo, net.preprocessing)[None]
    with torch.no_grad():
        x = normalize(pixels, net.preprocessing)
        expected = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
        logits = model(x)
    np.testing.assert_allclose(net.embed(pixels), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.imagenet_logits(pixels), logits)
    fast = build_backbone(f"timm:{TINY_TIMM}", weights=str(path), layers="2,3,last")  # OpenVINO
    assert fast.identity.feature_dim == 48 + 64 + 64
    np.testing.assert_allclose(fast.embed(pixels)[:, -64:], expected, rtol=1e-4, atol=1e-4)


def test_timm_weights_are_found_in_the_hugging_face_cache(tiny_timm, tmp_path, monkeypatch, photo):
    model, path = tiny_timm
    repo = tmp_path / "hub" / f"models--timm--{TINY_TIMM}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(path.read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    net = build_backbone(f"timm:{TINY_TIMM}", engine="torch", optimize=False)
    assert net.identity.weights == "r160_in1k"
    with torch.no_grad():
        x = normalize(load_pixels(photo, net.preprocessing)[None], net.preprocessing)
        expected = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    np.testing.assert_allclose(net.embed(load_pixels(photo, net.preprocessing)[None]), expected, rtol=1e-5)


def test_missing_timm_weights_say_what_to_place_where(tiny_timm, tmp_path, monkeypatch, dataset, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(WeightsUnavailableError) as e:
        build_backbone(f"timm:{TINY_TIMM}")
    message = str(e.value)
    assert f"https://huggingface.co/timm/{TINY_TIMM}/resolve/main/model.safetensors" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / f"timm-{TINY_TIMM}.safetensors") in message
    assert run("extract", str(dataset), "-o", str(tmp_path / "f.h5"), "--backbone", f"timm:{TINY_TIMM}") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--weights PATH" in err
    placed = tmp_path / "torch" / "hub" / "checkpoints" / f"timm-{TINY_TIMM}.safetensors"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(tiny_timm[1].read_bytes())  # where the error said
    assert build_backbone(f"timm:{TINY_TIMM}", engine="torch").identity.weights == "r160_in1k"


def test_an_unknown_timm_model_is_one_clear_error():
    with pytest.raises(FeatcacheError, match="timm has no model 'no_such_net'"):
        build_backbone("timm:no_such_net")


# ---- choose -----------------------------------------------------------------------------------


def test_the_sample_is_stratified_and_grows(tmp_path):
    data = make_dataset(tmp_path / "d", classes=("a", "b", "c"), per_class=9)
    small, large = sample(scan(data), 4), sample(scan(data), 6)
    assert [sum(p.startswith(f"{c}/") for p in small) for c in "abc"] == [4, 4, 4]
    assert set(small) < set(large) and len(large) == 18
    assert sample(scan(data), 4, seed=1) != small


def test_choose_ranks_by_cv_and_prints_a_command_that_runs(tmp_path, capsys, monkeypatch):
    data = make_dataset(tmp_path / "data", classes=("cat", "dog", "fox"), per_class=12)
    candidates = ["efficientnet_lite0@last", "efficientnet_lite0@0", "efficientnet_lite0@multi"]
    work = tmp_path / "work"
    result = choose(data, candidates, per_class=8, cv=3, workdir=work, run=RunOptions(engine="torch"))
    assert [str(s.candidate) for s in result.scored] != [] and result.n_images == 24
    means = [s.cv_accuracy_mean for s in result.scored]
    assert result.best.cv_accuracy_mean == max(means) and means == sorted(means, reverse=True)
    assert {s.layers for s in result.scored} == {"last", "0", "2,3,4,5,6,last"}
    assert all(s.n_computed == 24 and s.images_per_second > 0 for s in result.scored)
    again = choose(data, candidates, per_class=10, cv=3, workdir=work, run=RunOptions(engine="torch"))
    assert all(s.n_computed == 6 for s in again.scored)  # only the 2 new images per class

    flags = [arg for c in candidates for arg in ("--candidate", c)]
    flags += ["--per-class", "10", "--cv", "3", "--workdir", str(work), "--engine", "torch", "--json"]
    assert run("choose", str(data), "--only", *flags) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["best"]["cv_accuracy_mean"] == max(c["cv_accuracy_mean"] for c in printed["candidates"])
    command = shlex.split(printed["best"]["command"])
    assert command[:3] == ["featcache", "extract", str(data)]
    # pasted as printed, in a folder that already holds a features.h5 of other settings
    monkeypatch.chdir(tmp_path)
    extract(data, "features.h5", backbone="efficientnet_lite0", layers="1", engine="torch")
    assert run(*command[1:], "-q") == 0
    assert run(*shlex.split(printed["best"]["fit_command"])[1:], "--cv", "3") == 0
    chosen = read_cache(tmp_path / command[command.index("-o") + 1])
    assert chosen.identity.layers == printed["best"]["layers"] and len(chosen) == 36
    assert (tmp_path / "models" / "best.joblib").is_file()


def test_choose_refuses_what_cannot_work(tmp_path):
    data = make_dataset(tmp_path / "data", classes=("cat", "dog"), per_class=3)
    with pytest.raises(FeatcacheError, match="fewer than cv=5"):
        torch_run = RunOptions(engine="torch")
        choose(data, ["efficientnet_lite0"], per_class=3, workdir=tmp_path / "w", run=torch_run)
    with pytest.raises(FeatcacheError, match="expected BACKBONE, BACKBONE@LAYERS or BACKBONE@finetune:STAGE"):
        Candidate.parse("@multi")


def test_extract_can_take_some_files_only(tmp_path, dataset):
    files = ["cat/000.jpg", "dog/001.jpg"]
    result = extract(dataset, tmp_path / "f.h5", backbone="efficientnet_lite0", files=files, engine="torch")
    assert result.n_images == 2 and read_cache(tmp_path / "f.h5").paths == files
    with pytest.raises(FeatcacheError, match="not images under"):
        extract(dataset, tmp_path / "g.h5", backbone="efficientnet_lite0", files=["cat/nope.jpg"])


def test_a_multi_layer_model_predicts_what_its_cache_says(tmp_path, dataset):
    from featcache.fit import fit
    from featcache.predictor import Predictor

    cache_path = tmp_path / "f.h5"
    extract(dataset, cache_path, backbone="efficientnet_lite0", layers="multi")
    fitted = fit(cache_path, model="logreg", cv=3, output=tmp_path / "m")
    cache = read_cache(cache_path)
    predictor = Predictor.load(fitted.model_path)
    assert predictor.identity.layers == "2,3,4,5,6,last" and predictor.backbone.engine == "openvino"
    files = [dataset / p for p in cache.paths]
    np.testing.assert_allclose(predictor.embed(files), cache.features, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        predictor.predict_proba(files), predictor.bundle.predict_proba(cache.features), atol=1e-5
    )
