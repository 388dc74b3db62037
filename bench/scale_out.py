"""Distributed extraction: one process against a Dask cluster on the same cores, merge times, and
what a killed worker costs.

1. The same folder (500x375 JPEGs, ``efficientnet_lite0`` on OpenVINO) through ``extract`` in
   one process and with ``scheduler="local:2"`` on this machine's cores, alternating, each
   twice; images/s of the whole call (the cluster's start-up and merge included).
2. The merge of a synthetic cache of ``--rows`` x 1280 float32 in shards of 10,000 rows: copied
   into one file, or written as a virtual index; then reading each back.
3. The extra wall time of a cluster run when one worker is SIGKILLed after the first shard.

    python bench/scale_out.py [--jpeg 2000] [--rows 300000]
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
from harness import recorded


def throughput(data: Path, tmp: Path) -> None:
    from featcache.extract import extract

    settings = dict(backbone="efficientnet_lite0", overwrite=True)
    extract(data, tmp / "warm.h5", **settings)  # saves the OpenVINO model for every run below
    rates: dict[str, list[float]] = {"one process": [], "local:2": []}
    for _ in range(2):
        for name in rates:
            scheduler = None if name == "one process" else name
            start = time.perf_counter()
            result = extract(data, tmp / "f.h5", scheduler=scheduler, shard_size=64, **settings)
            rates[name].append(result.n_images / (time.perf_counter() - start))
    one, many = np.mean(rates["one process"]), np.mean(rates["local:2"])
    print(f"{result.n_images} JPEGs of 500x375, efficientnet_lite0 on OpenVINO, whole extract calls:")
    for name, values in rates.items():
        print(f"  {name:12} {np.mean(values):6.1f} img/s  ({', '.join(f'{v:.1f}' for v in values)})")
    print(f"  local:2 / one process = {many / one:.2f} (bar: within about 15 %)")


def merge(rows: int, tmp: Path) -> None:
    from featcache.backbones.identity import BackboneIdentity
    from featcache.cache import FeatureCache, read_cache, write_cache
    from featcache.preprocessing import Preprocessing

    identity = BackboneIdentity("efficientnet_lite0", "IMAGENET1K", "0" * 64, Preprocessing(), "avg", 1280)
    folders = [f"c{i}" for i in range(10)]
    r = np.random.default_rng(0)
    shard_rows, sources = 10_000, []
    folder = tmp / "merge" / "index.h5.shards"
    folder.mkdir(parents=True)
    for k, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        paths = [f"c{k % 10}/{start + i:07d}.jpg" for i in range(n)]
        part = FeatureCache(
            r.standard_normal((n, 1280), dtype=np.float32), np.full(n, k % 10, np.int32), paths,
            np.zeros(n, np.int64), np.zeros(n, np.int64), folders, identity,
        )  # fmt: skip
        write_cache(part, folder / f"shard-{k:05d}.h5")
        sources.append((folder / f"shard-{k:05d}.h5", n))
    start = time.perf_counter()
    shards = [read_cache(path) for path, _ in sources]
    whole = FeatureCache(
        np.concatenate([s.features for s in shards]), np.concatenate([s.labels for s in shards]),
        [p for s in shards for p in s.paths], np.concatenate([s.sizes for s in shards]),
        np.concatenate([s.mtimes_ns for s in shards]), shards[0].folders, identity,
    )  # fmt: skip
    del shards
    write_cache(whole, tmp / "merge" / "copy.h5")
    copy_s = time.perf_counter() - start
    start = time.perf_counter()
    empty = np.zeros((0, 1280), np.float32)
    index = FeatureCache(empty, whole.labels, whole.paths, whole.sizes, whole.mtimes_ns, folders, identity)
    write_cache(index, tmp / "merge" / "index.h5", features_from=sources)
    virtual_s = time.perf_counter() - start
    reads = {}
    for name in ("copy.h5", "index.h5"):
        start = time.perf_counter()
        read_cache(tmp / "merge" / name)
        reads[name] = time.perf_counter() - start
    size = {name: (tmp / "merge" / name).stat().st_size / 2**20 for name in ("copy.h5", "index.h5")}
    print(f"merge of {rows:,} x 1280 float32 rows in {len(sources)} shards of {shard_rows:,}:")
    for name, label, seconds in (("copy.h5", "copy", copy_s), ("index.h5", "virtual", virtual_s)):
        print(f"  {label:8} {seconds:6.1f} s  ({size[name]:7.1f} MiB), read back in {reads[name]:.1f} s")


def worker_kill(data: Path, tmp: Path) -> None:
    from distributed import Client, LocalCluster

    from featcache.extract import extract

    settings = dict(backbone="efficientnet_lite0", overwrite=True, shard_size=64)
    times = {}
    for kill in (False, True):
        with LocalCluster(
            n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
        ) as cluster:
            with Client(cluster) as client:
                pid = next(iter(client.run(os.getpid).values()))
                shards = tmp / "kill.h5.shards"

                def kill_after_first_shard(pid: int = pid, shards: Path = shards) -> None:
                    deadline = time.monotonic() + 300
                    while time.monotonic() < deadline and not list(shards.glob("shard-*.h5")):
                        time.sleep(0.02)
                    os.kill(pid, signal.SIGKILL)

                killer = threading.Thread(target=kill_after_first_shard) if kill else None
                start = time.perf_counter()
                if killer:
                    killer.start()
                extract(data, tmp / "kill.h5", scheduler=cluster.scheduler_address, **settings)
                times[kill] = time.perf_counter() - start
                if killer:
                    killer.join()
    print("one worker SIGKILLed after the first shard, on a running 2-worker cluster:")
    extra = times[True] - times[False]
    print(f"  no kill {times[False]:5.1f} s, with the kill {times[True]:5.1f} s: {extra:+.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jpeg", type=int, default=2000, help="500x375 JPEGs")
    parser.add_argument("--rows", type=int, default=300_000, help="rows of the synthetic merge")
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()
    import fashion

    data = fashion.jpeg_folder(args.workdir, args.jpeg)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FEATCACHE_CACHE_DIR"] = str(Path(tmp) / "cache")
        throughput(data, Path(tmp))
        worker_kill(data, Path(tmp))
        merge(args.rows, Path(tmp))


if __name__ == "__main__":
    with recorded():
        main()
