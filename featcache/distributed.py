"""Extraction on a Dask cluster: contiguous shards of the sorted file list, one task per shard.

Each task embeds its shard with an embedder built once per worker process, writes the rows to
``<output>.shards/shard-<n>-<key>.h5`` (a feature cache of its own, written whole) and returns
only counts. A shard's key hashes the backbone identity, the dtype and its files' paths, sizes
and modification times, so a shard finished by a run that later failed is reused by the next
one. The driver reads only the shards' listings: the shards are the segments of the cache it
indexes (see :mod:`featcache.cache`), copied into one file only for a new cache that is not
``virtual``. Workers must see the data folder and the output folder at the same paths.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache._version import __version__
from featcache.backbones.embedder import Embedder
from featcache.backbones.identity import BackboneIdentity, digest
from featcache.cache import read_cache, segment_folder, write_cache
from featcache.dataset import Dataset, ImageFile, LabelMap
from featcache.embedding import Row, assemble, embed_files
from featcache.errors import FeatcacheError
from featcache.settings import RunOptions

if TYPE_CHECKING:
    from distributed import Client

_EMBEDDERS: dict[str, Embedder] = {}


@dataclass(frozen=True)
class Shard:
    """One task's share of the work: ``files`` of the dataset, written to ``path``."""

    index: int
    files: tuple[ImageFile, ...]
    path: Path


def shard_folder(output: Path) -> Path:
    """Where the shards of ``output`` are kept: ``<output>.shards``, its segment folder."""
    return segment_folder(output)


def plan(
    files: list[ImageFile], identity: BackboneIdentity, dtype: str, output: Path, shard_size: int
) -> list[Shard]:
    """Cut ``files`` (in dataset order) into contiguous shards of at most ``shard_size`` files."""
    if shard_size < 1:
        raise FeatcacheError(f"shard_size must be at least 1, got {shard_size}")
    shards = []
    for index, start in enumerate(range(0, len(files), shard_size)):
        part = tuple(files[start : start + shard_size])
        key = digest(identity, dtype, [(f.relpath, f.size, f.mtime_ns) for f in part], length=16)
        shards.append(Shard(index, part, shard_folder(output) / f"shard-{index:05d}-{key}.h5"))
    return shards


def workers_to_start(scheduler: str) -> int | None:
    """The number of local workers ``scheduler`` asks for (None for a ``tcp://`` scheduler); an
    error for anything else."""
    if scheduler == "local" or scheduler.startswith("local:"):
        count = scheduler.partition(":")[2] or str(os.cpu_count() or 1)
        if not count.isdigit() or int(count) < 1:
            raise FeatcacheError(
                f"scheduler {scheduler!r}: the number of workers must be a whole number >= 1"
            )
        return int(count)
    if scheduler.startswith("tcp://"):
        return None
    raise FeatcacheError(f"scheduler must be local, local:N or tcp://HOST:PORT, got {scheduler!r}")


@contextmanager
def dask_client(scheduler: str) -> Iterator[Client]:
    """A Dask client: ``local`` or ``local:N`` starts a cluster of N worker processes (one thread
    each, all cores by default) on 127.0.0.1 and stops it afterwards; ``tcp://HOST:PORT`` joins
    a running scheduler."""
    from distributed import Client, LocalCluster

    if scheduler == "local" or scheduler.startswith("local:"):
        count = scheduler.partition(":")[2] or str(os.cpu_count() or 1)
        if not count.isdigit() or int(count) < 1:
            raise FeatcacheError(
                f"scheduler {scheduler!r}: the number of workers must be a whole number >= 1"
            )
        cluster = LocalCluster(
            n_workers=int(count),
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        )
        with cluster, Client(cluster) as client:
            yield client
    elif scheduler.startswith("tcp://"):
        try:
            client = Client(scheduler, timeout=30)
        except OSError as e:
            raise FeatcacheError(f"cannot reach the Dask scheduler at {scheduler} ({e})") from None
        with client:
            yield client
    else:
        raise FeatcacheError(f"scheduler must be local, local:N or tcp://HOST:PORT, got {scheduler!r}")


def run(
    client: Client,
    dataset: Dataset,
    shards: list[Shard],
    identity: BackboneIdentity,
    dtype: str,
    options: RunOptions,
    on_done: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, tuple[Path, int, int, int]], dict[str, str], int]:
    """Embed ``shards`` on the cluster; return where each of their rows is (shard file, row, file
    size, mtime), their skipped files, and how many rows were computed now (finished shards of an
    earlier run are reused). No features are read back.

    ``on_done(files, skipped)`` is called as each shard finishes.
    """
    _check_workers(client, dataset.root, shards[0].path.parent if shards else None)
    # a worker runs the backbone on its own machine: its device is its own to choose
    run_there = dataclasses.replace(options, device="auto", scheduler=None)
    common = {"root": str(dataset.root), "folders": dataset.folders, "identity": identity.to_dict(),
              "dtype": dtype, "run": run_there}  # fmt: skip
    specs = [
        {**common, "path": str(s.path), "files": [(f.relpath, f.label, f.size, f.mtime_ns) for f in s.files]}
        for s in shards
    ]
    from distributed import as_completed

    futures = client.map(embed_shard, specs, key=[f"featcache-{s.path.stem}" for s in shards], retries=2)
    index = {f.key: s for f, s in zip(futures, shards, strict=True)}
    computed = 0
    for future in as_completed(futures):
        shard = index[future.key]
        try:
            done = future.result()
        except Exception as e:  # KilledWorker, or a task that kept failing
            raise FeatcacheError(
                f"shard {shard.index} (from {shard.files[0].relpath}) failed: {type(e).__name__}: {e}; the "
                "finished shards are kept: run the same extract again to compute the rest"
            ) from None
        computed += done["computed"]
        if on_done:
            on_done(len(shard.files), done["skipped"])
    placed: dict[str, tuple[Path, int, int, int]] = {}
    skipped: dict[str, str] = {}
    for shard in shards:
        cache = read_cache(shard.path)
        where = shard.path.resolve()
        for i, (path, size, mtime) in enumerate(
            zip(cache.paths, cache.sizes.tolist(), cache.mtimes_ns.tolist(), strict=True)
        ):
            placed[path] = (where, i, size, mtime)
        skipped.update(cache.skipped)
    return placed, skipped, computed


def embed_shard(spec: dict[str, Any]) -> dict[str, int]:
    """The task: embed one shard and write it whole to ``spec["path"]``, unless a shard with the
    same key is already there. Returns counts, never features."""
    path = Path(spec["path"])
    if path.is_file():
        try:
            return {"computed": 0, "skipped": len(read_cache(path).skipped)}
        except FeatcacheError:
            path.unlink(missing_ok=True)  # damaged: computed again
    identity, run = BackboneIdentity.from_dict(spec["identity"]), spec["run"]
    net = _embedder(identity, run)
    files = [ImageFile(*f) for f in spec["files"]]
    dataset = Dataset(Path(spec["root"]), list(spec["folders"]), files, [])
    rows: dict[str, Row] = {}
    skipped: dict[str, str] = {}
    for batch_rows, batch_skipped in embed_files(net, dataset, files, run.batch_size, run.workers):
        rows.update(batch_rows)
        skipped.update(batch_skipped)
    listing = sorted(skipped.items(), key=lambda s: os.fsencode(s[0]))
    cache = assemble(dataset, identity, spec["dtype"], LabelMap(), {}, rows, listing)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_cache(cache, path)
    return {"computed": len(rows), "skipped": len(skipped)}


def _embedder(identity: BackboneIdentity, run: RunOptions) -> Embedder:
    """This worker's embedder for ``identity``, built on its first task."""
    from featcache.backbones.build import build_backbone

    key = digest(identity, run.device, run.engine)
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = build_backbone(identity, run)
    return _EMBEDDERS[key]


def _sees(root: str, folder: str | None) -> list[str]:
    """What this worker cannot see of the data folder and the output folder."""
    missing = [] if os.path.isdir(root) else [root]
    if folder is not None and not os.path.isdir(os.path.dirname(folder) or "."):
        missing.append(os.path.dirname(folder))
    return missing


def _version() -> str:
    return __version__


def _check_workers(client: Client, root: Path, shards: Path | None) -> None:
    """One clear error, before any work, when a worker cannot see the folders or runs other versions."""
    if not client.scheduler_info().get("workers"):
        client.wait_for_workers(1, timeout=60)
    try:
        client.get_versions(check=True)
    except ValueError as e:
        raise FeatcacheError(f"the Dask workers run other versions than this machine: {e}") from None
    versions = client.run(_version)
    other = {w: v for w, v in versions.items() if v != __version__}
    if other:
        raise FeatcacheError(f"Dask workers run featcache {sorted(set(other.values()))}, not {__version__}")
    blind = {
        w: m for w, m in client.run(_sees, str(root.resolve()), str(shards) if shards else None).items() if m
    }
    if blind:
        worker, missing = next(iter(blind.items()))
        raise FeatcacheError(
            f"Dask worker {worker} cannot see {missing[0]}: workers need the data and the output at the "
            "same paths as this machine"
        )
