"""Extraction on a Dask cluster (on 127.0.0.1): the same cache as one process, resumable, and it
survives a worker that dies."""

import os
import shutil
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
from conftest import make_dataset, make_image
from support import start_featcache

from featcache.cache import Rows, locations, read_cache
from featcache.errors import FeatcacheError
from featcache.extract import extract

pytest.importorskip("distributed")
pytestmark = pytest.mark.slow  # each test starts a cluster: run by make test and CI

LITE = {"backbone": "efficientnet_lite0", "batch_size": 4}


@pytest.fixture
def data(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=5)
    (root / "dog" / "broken.jpg").write_bytes(b"not a picture")
    return root


def _same(a, b):
    assert a.paths == b.paths and a.skipped == b.skipped and a.folders == b.folders
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.sizes, b.sizes)
    np.testing.assert_allclose(a.features, b.features, rtol=0, atol=1e-6)


def test_a_local_cluster_gives_the_single_process_cache(data, tmp_path):
    single = read_cache(extract(data, tmp_path / "one.h5", **LITE).output)
    result = extract(data, tmp_path / "many.h5", scheduler="local:2", shard_size=4, **LITE)
    assert result.shards == 4 and result.n_computed == 15
    many = read_cache(result.output)
    _same(many, single)
    assert many.shards == 4 and single.shards == 0
    assert not (tmp_path / "many.h5.shards").exists()


def test_maps_come_back_from_the_cluster_as_from_one_process(data, tmp_path):
    single = read_cache(extract(data, tmp_path / "one.h5", maps=5, **LITE).output, maps=True)
    result = extract(data, tmp_path / "many.h5", maps=5, scheduler="local:2", shard_size=4, **LITE)
    many = read_cache(result.output, maps=True)
    _same(many, single)
    assert many.identity.maps == 5
    np.testing.assert_allclose(
        many.maps.astype(np.float32), single.maps.astype(np.float32), rtol=0, atol=1e-2
    )
    index = extract(data, tmp_path / "v.h5", maps=5, scheduler="local:2", virtual=True, **LITE).output
    virtual = read_cache(index)
    assert virtual.features_virtual()  # the maps too are read from the shards
    np.testing.assert_array_equal(np.asarray(virtual.maps), np.asarray(many.maps))


def test_a_rerun_computes_only_what_changed_and_appends_its_shards(data, tmp_path, monkeypatch):
    out = tmp_path / "features.h5"
    extract(data, out, scheduler="local:2", shard_size=4, **LITE)
    assert not read_cache(out).features_virtual()  # a new cache: its shards copied into one file
    (data / "cat" / "000.jpg").unlink()
    make_image(data / "cat" / "001.jpg", 4242)  # changed
    os.utime(data / "cat" / "001.jpg", ns=(1, 1))
    make_image(data / "fox" / "new.jpg", 4343)  # added

    def refuse(self, *spans):
        raise AssertionError("the driver read rows")

    with monkeypatch.context() as m:
        m.setattr(Rows, "_read", refuse)  # in this process, the driver: the workers are others
        again = extract(data, out, scheduler="local:2", shard_size=4, **LITE)
    assert (again.n_computed, again.n_removed) == (2, 1)
    assert {p.name.split("-")[0] for p in locations(out).files} == {"base", "shard"}  # appended, not copied
    fresh = read_cache(extract(data, tmp_path / "fresh.h5", **LITE).output)
    _same(read_cache(out), fresh)


def test_a_killed_driver_leaves_finished_shards_that_the_rerun_reuses(data, tmp_path):
    out = tmp_path / "features.h5"
    shards = tmp_path / "features.h5.shards"
    args = ["extract", data, "-o", out, "--scheduler", "local:2", "--shard-size", "2", "--batch-size", "2",
            "--backbone", "efficientnet_lite0", "-q"]  # fmt: skip
    extract(data, tmp_path / "warm.h5", **LITE)  # the OpenVINO model is built before the race below
    proc = start_featcache(args, start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(shards.glob("shard-*.h5"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its cluster
    proc.wait(timeout=30)
    finished = len(list(shards.glob("shard-*.h5")))
    assert 2 <= finished < 8, finished
    assert not out.exists()
    result = extract(
        data, out, scheduler="local:2", shard_size=2, batch_size=2, backbone="efficientnet_lite0"
    )
    assert result.n_computed == 15 - 2 * finished  # every shard holds two readable images but the broken one
    _same(read_cache(out), read_cache(extract(data, tmp_path / "one.h5", **LITE).output))
    assert not shards.exists()


def test_a_worker_killed_mid_run_is_replaced(data, tmp_path):
    from distributed import Client, LocalCluster

    single = read_cache(extract(data, tmp_path / "one.h5", **LITE).output)
    out = tmp_path / "features.h5"
    shards = tmp_path / "features.h5.shards"
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster:
        with Client(cluster) as client:
            pids = list(client.run(os.getpid).values())

            def kill_one_after_the_first_shard():
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and not list(shards.glob("shard-*.h5")):
                    time.sleep(0.02)
                os.kill(pids[0], signal.SIGKILL)

            killer = threading.Thread(target=kill_one_after_the_first_shard)
            killer.start()
            result = extract(data, out, scheduler=cluster.scheduler_address, shard_size=2, batch_size=2,
                             backbone="efficientnet_lite0")  # fmt: skip
            killer.join(timeout=130)
    _same(read_cache(result.output), single)
    assert not shards.exists() and not list(tmp_path.glob(".*tmp*"))


def test_scheduler_errors_are_one_line(data, tmp_path):
    with pytest.raises(FeatcacheError, match="scheduler must be local, local:N or tcp://HOST:PORT"):
        extract(data, tmp_path / "f.h5", scheduler="yarn", **LITE)
    with pytest.raises(FeatcacheError, match="number of workers"):
        extract(data, tmp_path / "f.h5", scheduler="local:0", **LITE)
    with pytest.raises(FeatcacheError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        extract(data, tmp_path / "f.h5", scheduler="tcp://127.0.0.1:9", **LITE)
    shutil.rmtree(tmp_path / "f.h5.shards", ignore_errors=True)


def test_a_virtual_index_reads_like_a_copy_and_never_gives_nan(data, tmp_path):
    single = read_cache(extract(data, tmp_path / "one.h5", **LITE).output)
    out = tmp_path / "index" / "features.h5"
    result = extract(data, out, scheduler="local:2", shard_size=4, virtual=True, **LITE)
    assert result.shards == 4 and out.stat().st_size < 100_000
    _same(read_cache(out), single)
    moved = tmp_path / "moved"
    shutil.move(out.parent, moved)  # shard paths are relative to the index
    _same(read_cache(moved / "features.h5"), single)
    again = extract(data, moved / "features.h5", scheduler="local:2", shard_size=4, virtual=True, **LITE)
    assert again.n_computed == 0  # every shard reused
    shards = sorted((moved / "features.h5.shards").glob("shard-*.h5"))
    assert len(shards) == 4
    shards[1].write_bytes(shards[1].read_bytes()[:500])  # damaged
    with pytest.raises(FeatcacheError, match=f"its shard features.h5.shards/{shards[1].name} is unreadable"):
        read_cache(moved / "features.h5")
    shards[1].unlink()  # missing
    with pytest.raises(FeatcacheError, match=f"its shard features.h5.shards/{shards[1].name} is missing"):
        read_cache(moved / "features.h5")
    with pytest.raises(FeatcacheError, match="give a scheduler too"):
        extract(data, tmp_path / "v.h5", virtual=True, **LITE)
