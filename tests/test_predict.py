import json
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_dataset, synthetic_cache
from PIL import Image

import featcache
from featcache.backbones import BackboneIdentity, Preprocessing
from featcache.cache import read_cache
from featcache.cli import cli
from featcache.dataset import load_label_map
from featcache.errors import FeatcacheError
from featcache.extract import extract
from featcache.fit import evaluate, fit
from featcache.images import load_pixels
from featcache.predictor import Predictor

# one class of each garbage26 category, so the categories can be checked
CLASSES = ("00_00", "01_04", "02_01", "03_03")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    data = make_dataset(tmp / "data", classes=CLASSES, per_class=6)
    cache = tmp / "features.h5"
    extract(data, cache, backbone="efficientnet_lite0", labels="garbage26", workers=0)
    result = fit(cache, model="logreg", cv=3, output=tmp / "models")
    return tmp, data, cache, result.model_path


@pytest.fixture(scope="module")
def predictor(trained):
    return Predictor.load(trained[3])


def test_predictor_features_equal_the_cache(trained, predictor):
    _, data, cache, _ = trained
    c = read_cache(cache)
    paths = [str(data / p) for p in c.paths]
    # as a batch, and one image at a time (another batch composition)
    np.testing.assert_allclose(predictor.embed(paths), c.features, rtol=0, atol=1e-6)
    for i in (0, 7, 23):
        np.testing.assert_allclose(predictor.embed(paths[i]), c.features[i], rtol=0, atol=1e-6)
    # a PIL image and an array of the same file give the same features as the path
    arr = np.asarray(Image.open(paths[5]).convert("RGB"))
    np.testing.assert_array_equal(predictor.embed(arr), predictor.embed(Image.open(paths[5])))
    np.testing.assert_allclose(predictor.embed(arr), c.features[5], rtol=0, atol=1e-6)


def test_predict_over_training_folder_agrees_with_evaluate(trained, predictor):
    _, data, cache, model_path = trained
    c = read_cache(cache)
    ev = evaluate(cache, model_path)
    by_path = {p.path: p for p in predictor.predict_files([data])}
    assert all(p.error is None for p in by_path.values()) and len(by_path) == len(c)
    truth = [c.label_map.display(c.folders[k]) for k in c.labels]
    got = [by_path[str(data / p)].label for p in c.paths]
    expected = [c.label_map.display(k) for k in predictor.bundle.pipeline.predict(c.features)]
    assert got == expected
    assert np.mean(np.array(got) == np.array(truth)) == pytest.approx(ev.accuracy)


def test_classes_and_single_or_many(predictor, trained):
    data = trained[1]
    names = load_label_map("garbage26").names
    assert predictor.names == [names[c] for c in CLASSES]
    one = str(data / "02_01" / "000.jpg")
    assert isinstance(predictor.predict(one), str)
    many = predictor.predict([one, one])
    assert isinstance(many, list) and len(many) == 2
    proba = predictor.predict_proba(one)
    assert proba.shape == (len(CLASSES),) and proba.sum() == pytest.approx(1)
    assert predictor.predict_proba([one, one]).shape == (2, len(CLASSES))
    jpeg = (data / "02_01" / "000.jpg").read_bytes()  # the bytes of a file are one image, not many
    assert predictor.predict(jpeg) == predictor.predict(one)
    assert predictor.predict([jpeg, jpeg]) == [predictor.predict(one)] * 2
    assert predictor.predict_proba(jpeg).shape == (len(CLASSES),)


def test_course_predict_function_returns_a_label_map_name(trained, monkeypatch):
    tmp, data, _, model_path = trained
    monkeypatch.chdir(tmp)  # the default model path is models/best.joblib
    arr = np.asarray(Image.open(data / "03_03" / "001.jpg").convert("RGB"))
    label = featcache.predict(arr)
    assert type(label) is str and label in load_label_map("garbage26").names.values()
    assert featcache.predict(arr) == label  # second call reuses the loaded model
    jpeg = (data / "03_03" / "001.jpg").read_bytes()
    assert featcache.predict(jpeg) == featcache.predict(str(data / "03_03" / "001.jpg"))
    with pytest.raises(FeatcacheError, match="no such model"):
        featcache.predict(arr, model_path=tmp / "nope.joblib")


def test_categories_follow_the_preset(predictor, trained):
    data = trained[1]
    lm = load_label_map("garbage26")
    category_of_name = {lm.display(f): lm.category(f) for f in lm.names}
    predictions = list(predictor.predict_files([data]))
    assert {p.category for p in predictions} <= {"recyclable", "dry", "hazardous", "wet"}
    for p in predictions:
        assert p.category == category_of_name[p.label]
    right = [p for p in predictions if p.label == lm.display(p.path.split("/")[-2])]
    assert right and all(p.category == lm.category(p.path.split("/")[-2]) for p in right)


def test_top_k_sorted_and_at_most_one(predictor, trained):
    for p in predictor.predict_files([trained[1]], top_k=3):
        probs = [q for _, q in p.top_k]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        assert sum(probs) <= 1 + 1e-9 and p.top_k[0] == (p.label, p.probability)
    full = next(predictor.predict_files([trained[1]], top_k=10))
    assert len(full.top_k) == len(CLASSES) and sum(q for _, q in full.top_k) == pytest.approx(1)


def test_cli_json_reports_bad_files_and_predicts_the_rest(trained, tmp_path):
    _, data, _, model_path = trained
    good = data / "00_00" / "000.jpg"
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(good.read_bytes()[:200])
    args = ["predict", str(good), str(bad), str(tmp_path / "missing.png"), str(data / "01_04"),
            "--model-path", str(model_path), "--json", "--top-k", "2"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 3 + 6
    assert [d["path"] for d in lines[:3]] == [str(good), str(bad), str(tmp_path / "missing.png")]
    ok = [d for d in lines if "error" not in d]
    assert len(ok) == 7
    for d in ok:
        assert set(d) == {"path", "label", "probability", "top_k", "category", "ood_score", "unknown"}
        assert len(d["top_k"]) == 2
        assert d["top_k"][0] == {"label": d["label"], "probability": d["probability"]}
    errors = {d["path"]: d["error"] for d in lines if "error" in d}
    assert set(errors) == {str(bad), str(tmp_path / "missing.png")}
    assert "truncated" in errors[str(bad)] or "cannot" in errors[str(bad)]


def test_cli_plain_output(trained):
    _, data, _, model_path = trained
    result = CliRunner().invoke(cli, ["predict", str(data / "02_01"), "--model-path", str(model_path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 6
    path, rest = lines[0].split("\t")
    assert path == str(data / "02_01" / "000.jpg")
    shown = [line.split("\t")[1] for line in lines]
    known = [s for s in shown if not s.startswith("unknown")]
    assert known and all(s.endswith("]") and "%" in s for s in known)  # label 99.0%  [category]
    assert all(re.fullmatch(r"unknown \(closest: .+ \d+ %\)", s) for s in shown if s not in known)


def test_bundle_with_missing_weights_gives_the_extract_error(tmp_path):
    sha = "b0353104" + "0" * 56
    ident = BackboneIdentity("mobilenet_v2", "IMAGENET1K_V1", sha, Preprocessing(), "avg", 32)
    cache = synthetic_cache(tmp_path / "f.h5", identity=ident)
    model = fit(cache, model="logreg", cv=3, output=tmp_path / "m").model_path
    with pytest.raises(FeatcacheError, match="mobilenet_v2 weights IMAGENET1K_V1 are not on this machine"):
        Predictor.load(model)
    result = CliRunner().invoke(cli, ["predict", "x.jpg", "--model-path", str(model)])
    assert result.exit_code == 1


def test_traced_backbone_is_saved_checked_and_reused(trained, tmp_path, monkeypatch):
    from featcache.backbones.build import build_backbone
    from featcache.backbones.eager import EagerBackbone
    from featcache.backbones.traced import TracedBackbone, trace_path

    monkeypatch.setenv("FEATCACHE_CACHE_DIR", str(tmp_path / "cache"))
    _, data, cache, _ = trained
    c = read_cache(cache)
    pixels = np.stack([load_pixels(data / p, c.identity.preprocessing) for p in c.paths[:5]])
    built = build_backbone(c.identity, engine="torch")
    path = trace_path(c.identity, "cpu")
    assert isinstance(built, EagerBackbone) and path.is_file()
    loaded = build_backbone(c.identity, engine="torch")
    assert isinstance(loaded, TracedBackbone) and loaded.identity == c.identity
    np.testing.assert_array_equal(loaded.embed(pixels), built.embed(pixels))
    np.testing.assert_allclose(loaded.embed(pixels), c.features[:5], rtol=0, atol=2e-5)  # made by OpenVINO
    path.write_bytes(path.read_bytes()[:1000])  # a damaged trace is rebuilt, never used
    assert isinstance(build_backbone(c.identity, engine="torch"), EagerBackbone)
    assert isinstance(build_backbone(c.identity, engine="torch"), TracedBackbone)


@pytest.mark.parametrize("call", ["Predictor", "featcache.predict", "cli"])
def test_predicting_imports_neither_torch_timm_nor_sklearn(trained, call, monkeypatch):
    tmp, data, _, model_path = trained
    image, model = str(data / "00_00" / "000.jpg"), str(model_path)
    predict = {
        "Predictor": f"import featcache.predictor as p; p.Predictor.load({model!r}).predict({image!r})",
        "featcache.predict": f"import featcache; featcache.predict({image!r}, model_path={model!r})",
        "cli": (
            "from featcache.cli import main\n"
            f"try: main(['predict', {image!r}, '--model-path', {model!r}])\n"
            "except SystemExit as e: assert e.code == 0"
        ),
    }[call]
    code = f"{predict}\nimport sys, json; print(json.dumps([m in sys.modules for m in MODULES]))"
    code = code.replace("MODULES", "('torch', 'torchvision', 'timm', 'sklearn')")
    run = lambda: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)  # noqa: E731
    run()  # the first process on a machine may build the OpenVINO model (with torch) and save it
    out = run()
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, False, False, False]


@pytest.mark.filterwarnings("ignore:class .* recall")  # 4 images of random classes: some are missed
def test_evaluating_a_folder_gives_exactly_the_labels_predict_gives(tmp_path):
    """float16 features round differently from float32 ones: both commands must round the same way."""
    data = make_dataset(tmp_path / "data", classes=CLASSES, per_class=6)
    held_out = make_dataset(tmp_path / "held_out", classes=CLASSES, per_class=4, seed=3)
    (held_out / "00_00" / "broken.jpg").write_bytes(b"not a picture")
    cache = extract(
        data, tmp_path / "f16.h5", backbone="efficientnet_lite0", dtype="float16", labels="garbage26"
    )
    model = fit(cache.output, model="linsvm", cv=3, output=tmp_path / "models").model_path
    ev = evaluate(held_out, model)
    result = CliRunner().invoke(cli, ["predict", str(held_out), "--model-path", str(model), "--json"])
    records = {json.loads(line)["path"]: json.loads(line) for line in result.stdout.splitlines()}
    assert ev.n_images == 16 and len(records) == 17 and ev.skipped == [("00_00/broken.jpg", ev.skipped[0][1])]
    names = load_label_map("garbage26").names
    for path, predicted in zip(ev.paths, ev.predicted, strict=True):
        assert records[str(held_out / path)]["label"] == names[predicted]
    right = [names[t] == records[str(held_out / p)]["label"] for p, t in zip(ev.paths, ev.truth, strict=True)]
    assert ev.accuracy == pytest.approx(np.mean(right))
