"""Several processes at once: predictors sharing one bundle, readers of a cache that is being updated."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from conftest import make_dataset, make_image
from support import start_featcache

from featcache.cache import read_cache
from featcache.extract import extract
from featcache.fit import evaluate, fit
from featcache.predictor import Predictor

pytestmark = pytest.mark.slow  # run by make test and CI, left out by pytest -m "not slow"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrent")
    data = make_dataset(root / "data", classes=("a", "b"), per_class=8)
    cache = extract(data, root / "features.h5", backbone="efficientnet_lite0").output
    model = fit(cache, model="logreg", cv=2, output=root / "models").model_path
    return root, data, model


@pytest.mark.parametrize("engine", ["torch", "openvino"])
def test_predictors_in_parallel_agree_and_share_one_saved_model(trained, tmp_path, monkeypatch, engine):
    root, data, model = trained
    traces = tmp_path / "traces"
    monkeypatch.setenv("FEATCACHE_CACHE_DIR", str(traces))  # empty: all four race to build the model
    procs = [
        start_featcache(
            ["predict", data, "--model-path", model, "--json", "--top-k", "2", "--engine", engine],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in outputs]
    records = [[json.loads(line) for line in out.splitlines()] for out, _ in outputs]
    assert all(r == records[0] for r in records) and len(records[0]) == 16
    expected = Predictor.load(model, engine=engine).predict_files([data], top_k=2)
    for got, want in zip(records[0], expected, strict=True):
        assert got["label"] == want.label
        assert got["probability"] == pytest.approx(want.probability, abs=1e-6)
    if engine == "torch":
        saved = list((traces / "traced").iterdir())
        assert len(saved) == 1 and saved[0].suffix == ".pt", saved  # one whole trace, no leftovers
    else:
        (saved,) = (traces / "openvino").iterdir()  # one IR folder, no scratch folders left
        assert sorted(p.name for p in saved.iterdir()) == ["manifest.json", "model.bin", "model.xml"]


def test_readers_see_the_old_or_the_new_cache_while_extract_updates_it(trained, tmp_path):
    root, data, model = trained
    out = tmp_path / "features.h5"
    grown = tmp_path / "grown"
    shutil.copytree(data, grown)
    old = read_cache(extract(grown, out, backbone="efficientnet_lite0", batch_size=4).output).load()
    for i in range(16):
        make_image(grown / "a" / f"more{i:02d}.jpg", 7000 + i)
    new = read_cache(extract(grown, tmp_path / "reference.h5", backbone="efficientnet_lite0").output)
    args = ["extract", grown, "-o", out, "--backbone", "efficientnet_lite0", "--batch-size", "4", "-q"]
    proc = start_featcache(args, stderr=subprocess.PIPE)
    seen = {"old": 0, "new": 0}
    while True:
        running = proc.poll() is None
        cache = read_cache(out)
        for name, whole in (("old", old), ("new", new)):
            if cache.paths == whole.paths:
                assert np.array_equal(cache.features, whole.features)
                seen[name] += 1
                break
        else:
            pytest.fail(f"a reader saw a cache of {len(cache)} rows that is neither the old nor the new one")
        if seen["old"] % 5 == 1:  # a later read: the cache may have been replaced in between
            assert evaluate(out, model).n_images in (len(old), len(new))
        if not running:
            break
    assert proc.returncode == 0, proc.stderr.read()
    assert seen["old"] >= 5 and seen["new"] >= 1, seen


def _second_while_first_holds_the_lock(first: list, second: list, lock) -> tuple:
    """Start ``featcache FIRST``; once it holds ``lock``, run ``featcache SECOND`` to its end."""
    import time

    a = start_featcache(first, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not lock.exists():
        assert a.poll() is None, a.communicate()
        assert time.monotonic() < deadline, "the first run never took its lock"
        time.sleep(0.02)
    b = start_featcache(second, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b_out = b.communicate(timeout=300)
    a_out = a.communicate(timeout=300)
    return a, a_out, b, b_out


def test_a_second_extract_into_the_same_cache_is_refused_while_the_first_runs(tmp_path):
    data = make_dataset(tmp_path / "data", classes=("a", "b"), per_class=30)
    out = tmp_path / "conc.h5"
    first = ["extract", data, "-o", out, "--backbone", "efficientnet_lite0", "--engine", "torch", "-q"]
    second = ["extract", data, "-o", out, "--backbone", "efficientnet_lite1", "--engine", "torch", "-q"]
    a, a_out, b, b_out = _second_while_first_holds_the_lock(first, second, tmp_path / ".conc.h5.lock")
    assert a.returncode == 0, a_out[1]
    assert b.returncode == 1
    assert b_out[1].strip() == f"error: another featcache extract is writing {out} (pid {a.pid})"
    assert read_cache(out).identity.backbone == "efficientnet_lite0"  # the first's, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conc.h5", "data"]  # no lock, no partial left


def test_a_second_fit_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    from conftest import synthetic_cache

    from featcache.bundle import load_bundle

    cache = synthetic_cache(tmp_path / "f.h5", n_classes=10, per_class=300, dim=256, separation=0.3)
    models = tmp_path / "models"
    first = ["fit", cache, "-o", models, "--cv", "5"]
    second = ["fit", cache, "-o", models, "--model", "logreg", "--cv", "2"]
    a, a_out, b, b_out = _second_while_first_holds_the_lock(first, second, models / ".best.joblib.lock")
    assert a.returncode == 0, a_out[1]
    assert b.returncode == 1
    expected = f"error: another featcache fit is writing {models / 'best.joblib'} (pid {a.pid})"
    assert b_out[1].strip() == expected
    assert load_bundle(models).report["cv"] == 5  # the first's
    assert not (models / ".best.joblib.lock").exists()
