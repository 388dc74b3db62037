"""extract and fit killed with SIGKILL: at moments of the run, and at every file rename they do."""

import shutil
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
from conftest import make_dataset, make_image, synthetic_cache
from support import run_featcache, start_featcache

from featcache.bundle import load_bundle
from featcache.cache import locations, read_cache
from featcache.extract import extract
from featcache.fit import fit

ARGS = ["--backbone", "efficientnet_lite0", "--batch-size", "4", "-q"]

pytestmark = pytest.mark.slow  # run by make test and CI, left out by pytest -m "not slow"


def _start(data, out):
    args = ["extract", data, "-o", out, *ARGS]
    return start_featcache(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc, ready, timeout=120):
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"extract finished before the kill point: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("kill point never reached")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _parts(out):
    folder = out.with_name(f".{out.name}.partial")
    return len(list(folder.glob("part-*.npz"))) if folder.is_dir() else 0


def _assert_same(a, b):
    assert a.paths == b.paths and a.skipped == b.skipped and a.folders == b.folders
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.features, b.features)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    data = make_dataset(root / "data", classes=("a", "b"), per_class=20)
    (data / "a" / "broken.jpg").write_text("not an image")
    reference = extract(data, root / "reference.h5", backbone="efficientnet_lite0", batch_size=4)
    return data, read_cache(reference.output)


@pytest.mark.parametrize(
    "kill_point",
    [lambda out: True, lambda out: _parts(out) >= 1, lambda out: _parts(out) >= 6],
    ids=["at-start", "after-first-batch", "mid-run"],
)
def test_kill_then_rerun_equals_uninterrupted(corpus, tmp_path, kill_point):
    data, reference = corpus
    out = tmp_path / "features.h5"
    proc = _start(data, out)
    _kill_when(proc, lambda: kill_point(out))
    assert not out.exists()  # nothing half-written where the cache belongs
    done_before = _parts(out)
    result = extract(data, out, backbone="efficientnet_lite0", batch_size=4)
    assert result.n_computed <= 40 - 4 * max(0, done_before - 1)  # finished batches were reused
    _assert_same(read_cache(out), reference)
    assert _parts(out) == 0


def test_kill_during_update_keeps_previous_cache(corpus, tmp_path):
    data, reference = corpus
    out = tmp_path / "features.h5"
    grown = tmp_path / "grown"
    shutil.copytree(data, grown)
    extract(grown, out, backbone="efficientnet_lite0", batch_size=4)
    for i in range(12):
        make_image(grown / "b" / f"extra{i:02d}.jpg", 5000 + i)
    proc = _start(grown, out)
    _kill_when(proc, lambda: _parts(out) >= 2)
    with h5py.File(out, "r"):
        pass
    survivor = read_cache(out)
    assert survivor.paths == reference.paths  # the previous complete cache, untouched
    extract(grown, out, backbone="efficientnet_lite0", batch_size=4)
    final = read_cache(out)
    assert len(final) == 52 and final.skipped == survivor.skipped


def _snapshot(out, folder):
    """Copy the cache ``out`` (the file and its segments) into ``folder``; return a function that
    puts that copy back in place."""
    shards = out.with_name(out.name + ".shards")
    folder.mkdir()
    shutil.copy2(out, folder / out.name)
    if shards.is_dir():
        shutil.copytree(shards, folder / shards.name)

    def restore():
        shutil.rmtree(shards, ignore_errors=True)
        shutil.copy2(folder / out.name, out)
        if (folder / shards.name).is_dir():
            shutil.copytree(folder / shards.name, shards)

    return restore


@pytest.mark.parametrize("start", ["one-file", "segments"])
def test_kill_at_every_rename_of_an_update(tmp_path, start):
    """Each of the update's renames (batch files, the old file linked as a segment, the new segment,
    the index) is a kill point, before it and after; for a cache already in segments, so is each
    file deletion (the segments no longer indexed, the batch files). The cache always opens with the
    old rows or the new ones, and the rerun completes it."""
    data = make_dataset(tmp_path / "data", classes=("a", "b"), per_class=3)
    out = tmp_path / "features.h5"
    extract(data, out, backbone="efficientnet_lite0", batch_size=4)
    if start == "segments":
        (data / "a" / "000.jpg").unlink()
        make_image(data / "a" / "first.jpg", 800)
        extract(data, out, backbone="efficientnet_lite0", batch_size=4)
        assert read_cache(out).summary().segments == 2
    old = read_cache(out).load()
    restore = _snapshot(out, tmp_path / "snapshot")
    for i in range(6):
        make_image(data / "b" / f"new{i}.jpg", 900 + i)
    (data / "b" / "001.jpg").unlink()
    reference = extract(data, tmp_path / "reference.h5", backbone="efficientnet_lite0", batch_size=4)
    expected = read_cache(reference.output)
    kills = 0
    for when in ("before", "after"):
        for n in range(1, 40):
            restore()
            done = run_featcache(["extract", data, "-o", out, *ARGS], kill_at_replace=n, when=when,
                                 unlinks_too=start == "segments")  # fmt: skip
            if done.returncode == 0:
                break
            assert done.returncode == -signal.SIGKILL, done.stderr
            kills += 1
            now = read_cache(out)  # never unreadable: the old cache, or the new one once renamed
            assert now.same_content(old) or now.same_content(expected)
            extract(data, out, backbone="efficientnet_lite0", batch_size=4)
            assert read_cache(out).same_content(expected)
        assert n > 4  # the kills reached past the batch files
    assert kills >= 10
    assert not list(tmp_path.glob(".features.h5.tmp-*"))
    assert sorted(p.name for p in out.with_name("features.h5.shards").iterdir()) == sorted(
        p.name for p in locations(out).files
    )  # nothing left that the index does not use


def test_kill_fit_while_it_writes_the_model(tmp_path):
    """fit killed before or after each of the three renames that replace a model: it always loads."""
    cache = synthetic_cache(tmp_path / "features.h5", n_classes=3, per_class=10, dim=8)
    models = tmp_path / "models"
    fit(cache, model="softmax", cv=2, output=models)
    path = models / "best.joblib"
    families = []
    for when in ("before", "after"):
        for n in (1, 2, 3):  # the manifest accepting both files, the bundle, the final manifest
            done = run_featcache(["fit", cache, "--model", "logreg", "--cv", "2", "-o", models],
                                 kill_at_replace=n, when=when)  # fmt: skip
            assert done.returncode == -signal.SIGKILL, done.stderr
            families.append(load_bundle(path).family)  # raises if neither model loads
            fit(cache, model="softmax", cv=2, output=models)
    # the new model takes over whole, at the rename of the bundle (the second rename)
    assert families == ["softmax", "softmax", "logreg", "softmax", "logreg", "logreg"]
    assert not list(models.glob(".*.tmp-*"))
