"""`featcache export`: one ONNX file that gives featcache predict's probabilities."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from conftest import make_dataset
from PIL import Image

from featcache.backbones import Preprocessing
from featcache.bundle import load_bundle, save_bundle
from featcache.errors import FeatcacheError
from featcache.export import MAX_DIFFERENCE, export
from featcache.extract import extract
from featcache.fit import fit
from featcache.images import load_pixels
from featcache.predictor import Predictor

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "classify_onnx.py"
pytestmark = pytest.mark.filterwarnings("ignore:mobilenet_v2 uses random weights")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("export") / "data", per_class=8)


def _model(tmp_path, data, backbone, family, **extract_args):
    cache = tmp_path / "f.h5"
    extract(data, cache, backbone=backbone, **extract_args)
    return fit(cache, model=family, cv=3, output=tmp_path / "m").model_path


def _pixels(data, bundle):
    return np.stack([load_pixels(p, bundle.identity.preprocessing) for p in sorted(data.rglob("*.jpg"))])


def _agreement(onnx_path, model_path, pixels):
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"pixels": pixels})[0]
    expected = Predictor.load(model_path, device="cpu").predict_proba(list(pixels))
    return got, expected


CASES = [
    ("efficientnet_lite0", "logreg", {}),
    pytest.param("efficientnet_lite0", "linsvm", {}, marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", "logreg", {"weights": "random"}, marks=pytest.mark.slow),
    ("mobilenet_v2", "linsvm", {"weights": "random"}),
    ("efficientnet_lite0", "linsvm", {"layers": "multi", "dtype": "float16"}),
]


@pytest.mark.parametrize("backbone, family, extract_args", CASES)
def test_the_onnx_file_gives_predicts_probabilities(tmp_path, data, backbone, family, extract_args):
    model_path = _model(tmp_path, data, backbone, family, **extract_args)
    result = export(model_path, tmp_path / "model.onnx")
    assert result.max_difference <= MAX_DIFFERENCE and result.same_label == 1.0 and result.n_checked == 20
    bundle = load_bundle(model_path)
    got, expected = _agreement(result.path, model_path, _pixels(data, bundle))
    assert got.shape == expected.shape == (24, 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert (got.argmax(1) == expected.argmax(1)).all()
    # the out-of-distribution score too, on the training images and on noise
    assert result.ood_difference is not None and result.ood_difference <= MAX_DIFFERENCE
    size = bundle.identity.preprocessing.size
    noise = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    pixels = np.concatenate([_pixels(data, bundle), noise])
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got_ood = session.run(["ood_score"], {"pixels": pixels})[0]
    expected_ood = Predictor.load(model_path, device="cpu").ood_score(list(pixels))
    np.testing.assert_allclose(got_ood, expected_ood, rtol=0, atol=1e-4)
    threshold = json.loads(session.get_modelmeta().custom_metadata_map["featcache.ood"])["threshold"]
    assert threshold == bundle.outlier.threshold


def test_the_metadata_is_enough_to_use_the_file(tmp_path, data):
    model_path = _model(tmp_path, data, "efficientnet_lite0", "logreg")
    path = export(model_path, tmp_path / "model.onnx").path
    meta = onnxruntime.InferenceSession(str(path)).get_modelmeta().custom_metadata_map
    bundle = load_bundle(model_path)
    assert json.loads(meta["featcache.folders"]) == bundle.folders == ["cat", "dog", "fox"]
    assert json.loads(meta["featcache.names"]) == bundle.names
    recorded = Preprocessing.from_dict(json.loads(meta["featcache.preprocessing"]))
    assert recorded == bundle.identity.preprocessing
    assert json.loads(meta["featcache.identity"])["backbone"] == "efficientnet_lite0"
    report = json.loads(meta["featcache.report"])
    assert report["best"] == "logreg" and 0 <= report["families"]["logreg"]["cv_accuracy_mean"] <= 1


def test_an_export_that_disagrees_writes_nothing(tmp_path, data, monkeypatch):
    import featcache.export

    model_path = _model(tmp_path, data, "efficientnet_lite0", "logreg")
    monkeypatch.setattr(featcache.export, "MAX_DIFFERENCE", -1.0)
    with pytest.raises(FeatcacheError, match="differ from featcache predict's"):
        export(model_path, tmp_path / "model.onnx")
    assert list(tmp_path.glob("*model.onnx*")) == []


def test_a_model_without_a_linear_head_is_refused(tmp_path, data):
    import dataclasses

    model_path = _model(tmp_path, data, "efficientnet_lite0", "logreg")
    save_bundle(dataclasses.replace(load_bundle(model_path), head=None), tmp_path / "nohead.joblib")
    with pytest.raises(FeatcacheError, match="cannot be exported"):
        export(tmp_path / "nohead.joblib", tmp_path / "model.onnx")


BLOCK_FEATCACHE = """
import sys
class _NoFeatcache:
    def find_spec(self, name, path=None, target=None):
        if name == "featcache" or name.startswith("featcache."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _NoFeatcache())
sys.argv = ["classify_onnx.py", *sys.argv[1:]]
exec(compile(open("classify_onnx.py").read(), "classify_onnx.py", "exec"))
print("torch imported:", "torch" in sys.modules)
try:
    import featcache
    print("featcache importable")
except ImportError:
    pass
"""


def test_the_example_script_classifies_with_onnxruntime_alone(tmp_path, data):
    (tmp_path / "classify_onnx.py").write_text(EXAMPLE.read_text())
    model_path = _model(tmp_path, data, "efficientnet_lite0", "logreg")
    onnx_path = export(model_path, tmp_path / "model.onnx").path
    predictor = Predictor.load(model_path)
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(noise)
    shown_lines = []
    for image in [*sorted(data.rglob("*.jpg"))[::5], noise]:
        run = subprocess.run([sys.executable, "-I", "-c", BLOCK_FEATCACHE, str(onnx_path), str(image)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert run.returncode == 0, run.stderr
        first, torch_line = run.stdout.splitlines()[:2]
        p = next(predictor.predict_files([image]))
        closest = f"unknown (closest: {p.label} {p.probability:.0%})"
        assert first == (closest if p.unknown else f"{p.label} {p.probability:.1%}")
        assert torch_line == "torch imported: False" and "featcache importable" not in run.stdout
        shown_lines.append(first)
    assert any(not line.startswith("unknown") for line in shown_lines)
