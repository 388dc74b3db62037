"""Engines: OpenVINO and PyTorch give the same features; the saved IR is checked and rebuilt when
damaged; the engine is recorded, not compared; large JPEGs are decoded in draft mode."""

import io
import json

import numpy as np
import pytest
from conftest import make_dataset
from PIL import Image

import featcache.backbones.build as build
from featcache.backbones.build import build_backbone, resolve_engine
from featcache.backbones.eager import EagerBackbone
from featcache.backbones.openvino_engine import OpenVINOBackbone, ir_folder
from featcache.cache import read_cache, write_cache
from featcache.errors import CacheMismatchError, FeatcacheError, FeatcacheWarning
from featcache.extract import extract
from featcache.images import load_image, load_pixels
from featcache.preprocessing import Preprocessing


def _cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.filterwarnings("ignore::featcache.errors.FeatcacheWarning")  # random weights
@pytest.mark.parametrize("name, weights", [("efficientnet_lite0", None), ("mobilenet_v2", "random")])
def test_openvino_and_pytorch_features_agree(name, weights, photo, dataset):
    ov = build_backbone(name, weights=weights, engine="openvino")
    pt = build_backbone(name, weights=weights, engine="torch", traced=False)
    assert isinstance(ov, OpenVINOBackbone) and isinstance(pt, EagerBackbone)
    assert ov.identity == pt.identity and (ov.engine, pt.engine) == ("openvino", "torch")
    pixels = np.stack(
        [load_pixels(p, ov.preprocessing) for p in [photo, *sorted(dataset.rglob("*.jpg"))[:7]]]
    )
    a, b = ov.embed(pixels), pt.embed(pixels)
    assert a.shape == b.shape and a.dtype == np.float32 and np.abs(b).max() > 0
    assert _cosines(a, b).min() >= 0.99999
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
    np.testing.assert_allclose(ov.embed(pixels[:1]), a[:1], rtol=0, atol=1e-5)  # any batch size


def test_a_damaged_ir_is_rebuilt_never_used(tmp_path, monkeypatch, photo):
    monkeypatch.setenv("FEATCACHE_CACHE_DIR", str(tmp_path / "cache"))
    first = build_backbone("efficientnet_lite0", engine="openvino")
    folder = ir_folder(first.identity)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest) == ["model.bin", "model.xml"]
    pixels = load_pixels(photo, first.preprocessing)[None]
    expected = first.embed(pixels)
    built = []
    real = build._eager
    monkeypatch.setattr(build, "_eager", lambda *a, **k: built.append(1) or real(*a, **k))
    assert build_backbone(first.identity).embed(pixels).tolist() == expected.tolist()  # loaded, not built
    assert built == []
    weights = bytearray((folder / "model.bin").read_bytes())
    weights[len(weights) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    (folder / "model.bin").write_bytes(bytes(weights))
    again = build_backbone(first.identity)
    assert built == [1] and isinstance(again, OpenVINOBackbone)
    np.testing.assert_allclose(again.embed(pixels), expected, rtol=0, atol=1e-5)
    build_backbone(first.identity)
    assert built == [1]  # the rebuilt IR matches its manifest again, and is used


def test_a_network_that_does_not_convert_runs_in_pytorch(monkeypatch, photo):
    import featcache.backbones.openvino_engine as engine

    def refuse(net, identity):
        raise RuntimeError("the converter cannot take this network")

    monkeypatch.setattr(engine, "save_openvino", refuse)
    monkeypatch.setattr(engine, "load_openvino", lambda identity: None)
    monkeypatch.setattr(build, "cpu_has_bf16", lambda: True)  # the same on a CPU without bf16
    with pytest.warns(
        FeatcacheWarning, match="does not run on OpenVINO .*cannot take.*running it in PyTorch"
    ):
        net = build_backbone("efficientnet_lite0", precision="bf16")
    assert isinstance(net, EagerBackbone) and net.engine == "torch" and net.identity.precision == "bf16"


def test_engine_choice_and_errors():
    assert resolve_engine("auto", "cpu") == "openvino" and resolve_engine("auto", "cuda") == "torch"
    assert resolve_engine("torch", "cpu") == "torch"
    with pytest.raises(FeatcacheError, match="engine 'openvino' runs on the CPU"):
        resolve_engine("openvino", "cuda")
    with pytest.raises(FeatcacheError, match="engine must be one of"):
        resolve_engine("onnx", "cpu")


def test_bf16_on_a_cpu_without_bf16_says_so(monkeypatch):
    monkeypatch.setattr(build, "cpu_has_bf16", lambda: False)
    with pytest.warns(FeatcacheWarning, match="no bfloat16 instructions .*as fp32 would"):
        build_backbone("efficientnet_lite0", precision="bf16", engine="openvino")
    monkeypatch.setattr(build, "cpu_has_bf16", lambda: True)
    build_backbone("efficientnet_lite0", precision="bf16", engine="openvino")  # no warning: an error here


def test_the_engine_is_recorded_not_compared(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3)
    out = tmp_path / "features.h5"
    first = extract(data, out, backbone="efficientnet_lite0", engine="torch")
    assert first.engine == "torch" and read_cache(out).engine == "torch"
    (data / "cat" / "000.jpg").unlink()
    make_dataset(tmp_path / "data", classes=("owl",), per_class=2, seed=9)
    second = extract(data, out)  # the cache's backbone, on the default engine
    assert second.engine == "openvino" and (second.n_computed, second.n_reused) == (2, 8)
    assert read_cache(out).engine == "openvino, torch"


def test_a_cache_of_an_older_featcache_asks_for_overwrite_and_says_why(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=2)
    out = tmp_path / "features.h5"
    extract(data, out, backbone="efficientnet_lite0")
    cache = read_cache(out)
    old = cache.identity.to_dict()
    del old["preprocessing"]["jpeg_draft"]  # as featcache 0.1 wrote it
    cache.identity = type(cache.identity).from_dict(old)
    write_cache(cache, out)
    with pytest.raises(CacheMismatchError, match="jpeg_draft: False vs True.*draft mode.*overwrite=True"):
        extract(data, out)


def _jpeg(w: int, h: int) -> bytes:
    """A smooth picture, like a photo scaled up: gradients and slow waves."""
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    waves = 127.5 + 127.5 * np.sin(9 * x + 5 * y) * np.cos(7 * y)
    arr = np.stack([255 * x, 255 * y, waves], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(4032, 3024), (3024, 4032), (900, 460), (450, 2000), (300, 300)])
def test_draft_decoding_stays_above_the_target_and_near_the_full_decode(tmp_path, size):
    path = tmp_path / "big.jpg"
    path.write_bytes(_jpeg(*size))
    drafted = load_image(path, draft=224)
    scale = next(k for k in (8, 4, 2, 1) if min(size[0] // 224, size[1] // 224) >= k)
    assert drafted.size == (-(-size[0] // scale), -(-size[1] // scale)) and min(drafted.size) >= 224
    for resize in ("stretch", "center_crop"):
        prep = Preprocessing(resize=resize)
        a = load_pixels(path, prep).astype(int)
        b = load_pixels(path, Preprocessing(resize=resize, jpeg_draft=False)).astype(int)
        assert np.abs(a - b).mean() < 0.5 and np.percentile(np.abs(a - b), 99) <= 2, size


def test_draft_applies_to_jpegs_only(tmp_path):
    arr = np.asarray(Image.open(io.BytesIO(_jpeg(1200, 900))))
    png = tmp_path / "big.png"
    Image.fromarray(arr).save(png)
    assert load_image(png, draft=224).size == (1200, 900)
    jpg = tmp_path / "big.jpg"
    jpg.write_bytes(_jpeg(1200, 900))
    assert load_image(jpg, draft=224).size == (300, 225)
