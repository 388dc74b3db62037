"""INT8: the quantised OpenVINO network is a precision of its own (never mixed with fp32), close
to fp32, kept beside the fp32 IR with its own manifest and quantised again when damaged; a model
fit on INT8 features predicts with the INT8 network."""

import json
import subprocess
import sys

import httpx
import numpy as np
import onnx
import onnxruntime
import pytest
from conftest import make_dataset
from PIL import Image
from support import predict_in_a_new_process, serving

import featcache.backbones.build as build
import featcache.backbones.openvino_engine as engine
from featcache.backbones.build import build_backbone
from featcache.backbones.openvino_engine import OpenVINOBackbone, cosines, ir_folder
from featcache.backbones.quantize import MIN_MEAN_COSINE, calibration_pixels
from featcache.cache import read_cache
from featcache.errors import FeatcacheError, FeatcacheWarning
from featcache.export import MAX_INT8_DIFFERENCE, MIN_INT8_AGREEMENT, export
from featcache.extract import extract
from featcache.fit import fit
from featcache.images import resize
from featcache.predictor import Predictor

BACKBONE = "efficientnet_lite0"


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8")
    data = make_dataset(tmp / "data", per_class=8)
    cache = tmp / "int8.h5"
    extract(data, cache, backbone=BACKBONE, precision="int8", workers=0)
    result = fit(cache, model="logreg", cv=3, output=tmp / "models")
    return data, cache, result.model_path


def test_int8_features_are_their_own_identity_and_close_to_fp32(int8_model, tmp_path):
    data, cache, _ = int8_model
    int8 = read_cache(cache)
    assert int8.identity.precision == "int8" and int8.engine == "openvino"
    fp32 = read_cache(extract(data, tmp_path / "fp32.h5", backbone=BACKBONE, workers=0).output)
    assert fp32.paths == int8.paths and fp32.identity.differences(int8.identity)[0].field == "precision"
    cosine = cosines(fp32.features[:], int8.features[:]).mean()
    assert MIN_MEAN_COSINE <= cosine < 0.9999  # close, and not the fp32 network under another name
    with pytest.raises(FeatcacheError, match="precision: int8 vs fp32"):
        extract(data, cache, precision="fp32", workers=0)  # a cache never mixes them
    folders = {ir_folder(fp32.identity), ir_folder(int8.identity)}
    assert len(folders) == 2
    for folder in folders:
        assert sorted(json.loads((folder / "manifest.json").read_text())) == ["model.bin", "model.xml"]


def test_the_calibration_images_are_fixed_and_both_colour_and_grey():
    prep = build_backbone(BACKBONE).preprocessing
    first, again = calibration_pixels(prep, 20), calibration_pixels(prep, 20)
    assert first.shape == (20, prep.size, prep.size, 3) and np.array_equal(first, again)
    grey = [bool(np.all(img[..., 0] == img[..., 1])) for img in first]
    assert grey == [False, True] * 10 and len({img.tobytes() for img in first}) == 20


def test_a_damaged_int8_ir_is_quantised_again_from_the_fp32_ir(tmp_path, monkeypatch, photo):
    monkeypatch.setenv("FEATCACHE_CACHE_DIR", str(tmp_path / "cache"))
    first = build_backbone(BACKBONE, precision="int8")
    assert isinstance(first, OpenVINOBackbone) and first.identity.precision == "int8"
    crops = (photo[:, :80], photo[:, 40:])
    pixels = np.stack([resize(Image.fromarray(c), first.preprocessing) for c in crops])
    expected = first.embed(pixels)
    built, quantised = [], []
    real_eager, real_quantized = build._eager, engine._quantized
    monkeypatch.setattr(build, "_eager", lambda *a, **k: built.append(1) or real_eager(*a, **k))
    monkeypatch.setattr(engine, "_quantized", lambda *a: quantised.append(1) or real_quantized(*a))
    folder = ir_folder(first.identity)
    weights = bytearray((folder / "model.bin").read_bytes())
    weights[len(weights) // 2] ^= 0xFF
    (folder / "model.bin").write_bytes(bytes(weights))
    again = build_backbone(first.identity)
    assert (built, quantised) == ([], [1])  # from the fp32 IR on disk: no PyTorch network built
    np.testing.assert_allclose(again.embed(pixels), expected, rtol=0, atol=1e-5)  # the same quantisation
    build_backbone(first.identity)
    assert quantised == [1]  # the new INT8 IR matches its manifest, and is used


def test_int8_runs_on_openvino_only():
    with pytest.raises(FeatcacheError, match="precision 'int8' runs on the OpenVINO engine"):
        build_backbone(BACKBONE, precision="int8", engine="torch")


def test_a_model_fit_on_int8_features_predicts_with_the_int8_network(int8_model):
    data, cache, model_path = int8_model
    predictor = Predictor.load(model_path)
    assert predictor.backbone.identity.precision == "int8"
    rows = read_cache(cache)
    np.testing.assert_allclose(predictor.embed([str(data / p) for p in rows.paths]), rows.features,
                               rtol=0, atol=1e-5)  # fmt: skip
    with pytest.warns(FeatcacheWarning, match="fit on int8 features and its backbone runs in fp32"):
        fp32 = Predictor.load(model_path, precision="fp32")
    assert fp32.backbone.identity.precision == "fp32"
    one = str(data / rows.paths[0])
    args = [sys.executable, "-m", "featcache", "predict", one, "--model-path", str(model_path)]
    args += ["--precision", "fp32"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith(one), out.stderr
    assert "warning: the model was fit on int8 features and its backbone runs in fp32" in out.stderr


def test_the_int8_onnx_export_is_quantised_and_agrees_with_predict(int8_model, tmp_path):
    data, cache, model_path = int8_model
    result = export(model_path, tmp_path / "int8.onnx")  # a model fit on INT8 features: int8 by default
    fp32 = export(model_path, tmp_path / "fp32.onnx", precision="fp32")
    assert (result.precision, fp32.precision) == ("int8", "fp32")
    graph = onnx.load(str(result.path)).graph
    assert sum(node.op_type == "QuantizeLinear" for node in graph.node) >= 40  # every convolution's input
    assert result.path.stat().st_size < fp32.path.stat().st_size / 2
    assert result.mean_difference <= MAX_INT8_DIFFERENCE and result.same_label >= MIN_INT8_AGREEMENT
    assert result.mean_difference <= result.max_difference <= 1
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["featcache.identity"])["precision"] == "int8"
    predictor = Predictor.load(model_path, device="cpu")
    files = [str(data / p) for p in read_cache(cache).paths]
    pixels = np.stack([resize(Image.open(f).convert("RGB"), predictor.backbone.preprocessing) for f in files])
    got = session.run(["probabilities"], {"pixels": pixels})[0]
    expected = predictor.predict_proba(list(pixels))
    assert np.abs(got - expected).max(axis=1).mean() <= MAX_INT8_DIFFERENCE  # on the training images too
    assert np.mean(got.argmax(1) == expected.argmax(1)) >= MIN_INT8_AGREEMENT


def test_serve_runs_the_int8_network_of_a_model_fit_on_int8_features(int8_model):
    data, _, model_path = int8_model
    paths = sorted(data.rglob("*.jpg"))[:5]
    expected = [p.to_dict() for p in Predictor.load(model_path).predict_files(paths)]
    for extra, precision in (((), "int8"), (("--precision", "fp32"), "fp32")):
        with serving(model_path, *extra) as url, httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/health").json()["precision"] == precision
            files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
            got = client.post("/predict", files=files).json()
        assert [g["path"] for g in got] == [p.name for p in paths]
        if precision == "int8":
            probabilities = [e["probability"] for e in expected]
            assert [g["probability"] for g in got] == pytest.approx(probabilities, abs=1e-6)


def test_predicting_with_the_saved_int8_network_imports_neither_torch_nor_nncf(int8_model):
    data, _, model_path = int8_model
    done = predict_in_a_new_process(model_path, sorted(data.rglob("*.jpg"))[0])
    assert (done["precision"], done["engine"], done["imported"]) == ("int8", "openvino", [])
