"""extract killed with SIGKILL at several moments, then rerun, gives the uninterrupted result."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import make_dataset, make_image

from featcache.cache import read_cache
from featcache.extract import extract

CLI = str(Path(__file__).resolve().parents[1] / "cli.py")
ARGS = ["--backbone", "efficientnet_lite0", "--batch-size", "4", "-q"]


def _start(data, out):
    return subprocess.Popen(
        [sys.executable, CLI, "extract", str(data), "-o", str(out), *ARGS],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


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
    assert a.paths == b.paths and a.skipped == b.skipped and a.classes == b.classes
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
    extract(data, out, backbone="efficientnet_lite0", batch_size=4)
    grown = tmp_path / "grown"
    make_dataset(grown, classes=("a", "b"), per_class=20)
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
    assert len(final) == 52 and final.skipped == []
