import json
import os
import pickle

import numpy as np
import pytest
from conftest import IDENT, synthetic_cache

from featcache.backbones.registry import BackboneIdentity
from featcache.bundle import load_bundle, manifest_path, save_bundle
from featcache.errors import FeatcacheError
from featcache.fit import evaluate, fit
from featcache.images import Preprocessing


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    cache = synthetic_cache(tmp / "features.h5")
    result = fit(cache, model="all", cv=3, output=tmp / "models")
    return tmp, cache, result


def test_every_family_is_near_perfect_on_separated_features(fitted):
    _, _, result = fitted
    for name, r in result.report["families"].items():
        assert r["cv_accuracy_mean"] >= 0.98, (name, r)
        assert r["fit_seconds"] > 0 and r["best_params"]
    assert result.report["best"] in ("logreg", "linsvm", "softmax")
    assert result.model_path.is_file() and manifest_path(result.model_path).is_file()
    assert json.loads(result.report_path.read_text())["best"] == result.report["best"]
    assert result.confusion_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cm = np.array(result.report["confusion_matrix"])
    assert cm.shape == (4, 4) and cm.sum() == 120


@pytest.mark.parametrize("family", ["logreg", "linsvm", "softmax"])
def test_no_family_beats_chance_on_shuffled_labels(tmp_path, family):
    cache = synthetic_cache(tmp_path / "f.h5", shuffle_labels=True, per_class=40)
    report = fit(cache, model=family, cv=4, output=tmp_path / "m").report
    assert report["families"][family]["cv_accuracy_mean"] < 0.25 + 0.12  # chance is 0.25


def test_cv_results_identical_across_runs(tmp_path):
    cache = synthetic_cache(tmp_path / "f.h5", separation=0.4)  # hard enough that results vary with folds
    a = fit(cache, cv=3, output=tmp_path / "a").report
    b = fit(cache, cv=3, output=tmp_path / "b").report
    for family in a["families"]:
        ga, gb = a["families"][family]["grid"], b["families"][family]["grid"]
        assert ga == gb
    assert a["confusion_matrix"] == b["confusion_matrix"]
    c = fit(cache, cv=3, output=tmp_path / "c", seed=1).report
    assert any(c["families"][f]["grid"] != a["families"][f]["grid"] for f in a["families"])


def test_bundle_round_trip_and_evaluate(fitted):
    tmp, cache, result = fitted
    bundle = load_bundle(result.model_path)
    assert bundle["classes"] == ["c0", "c1", "c2", "c3"]
    assert bundle["identity"] == IDENT.to_dict() and bundle["family"] == result.report["best"]
    assert bundle["report"]["best"] == result.report["best"] and bundle["featcache_version"]
    ev = evaluate(cache, result.model_path)
    assert ev.accuracy == 1.0 and ev.macro_f1 == 1.0 and ev.n_images == 120


def test_tampered_bundles_are_refused_before_unpickling(fitted, tmp_path):
    _, _, result = fitted
    data = result.model_path.read_bytes()
    manifest = manifest_path(result.model_path).read_text()

    def place(name, payload, with_manifest=True):
        path = tmp_path / name
        path.write_bytes(payload)
        if with_manifest:
            manifest_path(path).write_text(manifest)
        return path

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    with pytest.raises(FeatcacheError, match="does not match its manifest.*refusing to unpickle"):
        load_bundle(place("flipped.joblib", bytes(flipped)))
    with pytest.raises(FeatcacheError, match="does not match its manifest"):
        load_bundle(place("short.joblib", data[: len(data) // 3]))

    class Boom:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w').write('x')",))

    evil = pickle.dumps(Boom())
    with pytest.raises(FeatcacheError, match="does not match its manifest"):
        load_bundle(place("evil.joblib", evil))
    with pytest.raises(FeatcacheError, match="no manifest"):
        load_bundle(place("bare.joblib", evil, with_manifest=False))
    assert not (tmp_path / "PWNED").exists() and not os.path.exists("PWNED")


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


def test_replacing_a_bundle_keeps_one_loadable(tmp_path):
    path = tmp_path / "m.joblib"
    save_bundle({"x": 1}, path)
    save_bundle({"x": 2}, path)
    assert load_bundle(path)["x"] == 2
    assert "previous_sha256" not in json.loads(manifest_path(path).read_text())


def test_model_refused_on_cache_of_other_backbone(fitted, tmp_path):
    _, _, result = fitted
    other = BackboneIdentity("mobilenet_v2", "IMAGENET1K_V1", "b" * 64, Preprocessing(), "avg", 32)
    cache = synthetic_cache(tmp_path / "other.h5", identity=other)
    with pytest.raises(
        FeatcacheError, match="extracted differently.*backbone: mobilenet_v2 vs efficientnet_lite0"
    ):
        evaluate(cache, result.model_path)


def test_too_few_images_per_class_is_a_clear_error(tmp_path):
    cache = synthetic_cache(tmp_path / "f.h5", per_class=3)
    with pytest.raises(FeatcacheError, match="fewer images than --cv 5 folds: c0 \\(3\\)"):
        fit(cache, cv=5, output=tmp_path / "m")
    with pytest.raises(FeatcacheError, match="model must be one of logreg, linsvm, softmax, all"):
        fit(cache, model="forest", output=tmp_path / "m")
