"""Damaged, swapped and malicious model files are refused with a clear message; no code runs."""

import json

import pytest
from conftest import synthetic_cache
from support import PWNED, tampered_models

import featcache.bundle
from featcache.backbones import BackboneIdentity, Preprocessing
from featcache.bundle import UnsafePickleError, load_bundle, manifest_path, safe_load
from featcache.cli import main
from featcache.errors import FeatcacheError
from featcache.fit import evaluate, fit

OTHER = BackboneIdentity("mobilenet_v2", "IMAGENET1K_V1", "b" * 64, Preprocessing(), "avg", 16)

EXPECTED = {
    "truncated to a third": "does not match its manifest",
    "truncated by one byte": "does not match its manifest",
    "one bit flipped at 10 %": "does not match its manifest",
    "one bit flipped at 50 %": "does not match its manifest",
    "one bit flipped at 90 %": "does not match its manifest",
    "another model's file, this model's manifest": "does not match its manifest",
    "manifest missing": "no manifest",
    "code-running pickle, no manifest": "no manifest",
    "code-running pickle, this model's manifest": "does not match its manifest",
    "code-running pickle, forged manifest": "refusing to load it: it asks for builtins.exec",
    "code-running object inside a bundle, forged manifest": "refusing to load it: it asks for builtins.exec",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tampered")
    cache = synthetic_cache(tmp / "features.h5", n_classes=3, per_class=10, dim=16)
    model = fit(cache, model="logreg", cv=2, output=tmp / "mine").model_path
    other_cache = synthetic_cache(tmp / "other.h5", n_classes=3, per_class=10, dim=16, identity=OTHER)
    other = fit(other_cache, model="logreg", cv=2, output=tmp / "other").model_path
    return cache, tampered_models(model, other, tmp / "tampered")


@pytest.fixture
def unpickled(monkeypatch):
    """Records every call that unpickles bytes."""
    calls = []
    real = featcache.bundle.safe_load
    monkeypatch.setattr(featcache.bundle, "safe_load", lambda data: calls.append(len(data)) or real(data))
    return calls


def test_every_tampered_file_is_refused_and_runs_nothing(models, tmp_path, monkeypatch, unpickled):
    monkeypatch.chdir(tmp_path)
    _, tampered = models
    assert set(EXPECTED) < set(tampered)
    for kind, message in EXPECTED.items():
        unpickled.clear()
        with pytest.raises(FeatcacheError, match=message):
            load_bundle(tampered[kind])
        if "forged" not in kind:
            assert unpickled == [], f"{kind}: unpickled before the manifest check"
    assert not (tmp_path / PWNED).exists()


def test_a_valid_bundle_of_another_backbone_is_refused_on_these_features(models):
    cache, tampered = models
    swapped = tampered["another backbone's valid bundle with its manifest"]
    assert load_bundle(swapped).identity.backbone == "mobilenet_v2"  # a genuine model...
    message = "extracted differently.*backbone: efficientnet_lite0 vs mobilenet_v2"
    with pytest.raises(FeatcacheError, match=message):
        evaluate(cache, swapped)  # ...but never applied to another backbone's features


def test_the_cli_says_one_line_and_exits_1(models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cache, tampered = models
    (tmp_path / "x.png").write_bytes(b"")
    for kind, path in tampered.items():
        args = ["evaluate", str(cache)] if "another backbone" in kind else ["predict", "x.png"]
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--model-path", str(path)])
        err = capsys.readouterr().err
        assert exit_.value.code == 1, (kind, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (kind, err)
    assert not (tmp_path / PWNED).exists()


def test_verified_but_foreign_payload_is_refused(tmp_path):
    import hashlib

    import joblib

    path = tmp_path / "m.joblib"
    joblib.dump([1, 2, 3], path)  # a harmless pickle that is not a featcache model
    data = path.read_bytes()
    manifest = {
        "format": "featcache-model-manifest",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }
    manifest_path(path).write_text(json.dumps(manifest))
    with pytest.raises(FeatcacheError, match="not a featcache model"):
        load_bundle(path)


@pytest.mark.parametrize(
    "module, name",
    [
        ("os", "system"),
        ("subprocess", "Popen"),
        ("builtins", "eval"),
        ("numpy", "memmap"),  # a NumPy class that creates files
        ("numpy", "load"),
        ("sklearn.utils.parallel", "Parallel"),  # scikit-learn, but not an estimator
        ("sklearn.base", "os"),  # a module that sklearn imported
        ("featcache.cli", "main"),
        ("sklearn.linear_model", "LogisticRegression.__init__"),
    ],
)
def test_the_allowlist_refuses_what_no_model_holds(module, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = b"\x80\x02" + f"c{module}\n{name}\n".encode() + b")R."  # call module.name()
    with pytest.raises(UnsafePickleError, match=f"asks for {module}.{name}"):
        safe_load(payload)
    assert list(tmp_path.iterdir()) == []
