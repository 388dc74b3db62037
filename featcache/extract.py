"""``extract``: run a backbone over every image of a folder once and keep the embeddings.

The work is resumable: finished batches are saved as small files in a ``.<output>.partial``
folder (each written whole, then renamed), and the cache itself is replaced in one rename at
the end. A run killed at any moment leaves the previous cache intact and its finished batches
reusable by the next run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featcache.backbones.embedder import Embedder
from featcache.backbones.identity import BackboneIdentity, digest
from featcache.backbones.registry import get_entry
from featcache.cache import (
    FORMAT_VERSION,
    FeatureCache,
    Locations,
    compact,
    locations,
    needs_compacting,
    read_cache,
    remove_unindexed,
    segment_folder,
    write_cache,
    write_index,
)
from featcache.choices import DTYPES
from featcache.dataset import Dataset, ImageFile, LabelMap, load_label_map, scan
from featcache.difference import Difference, worded
from featcache.distributed import workers_to_start
from featcache.embedding import Row, assemble, embed_files
from featcache.errors import CacheMismatchError, FeatcacheError, Interrupted
from featcache.files import locked, writable_file
from featcache.settings import BackboneSpec, CacheOptions, RunOptions, gather


@dataclass
class Progress:
    """Reported as work goes on: ``done`` out of ``total`` (``None``: unknown) in ``stage``, which is
    ``"extract"`` (images; ``skipped`` of them could not be read), ``"download"`` (bytes of weights)
    or ``"fit"`` (epochs of training, where ``choose`` cross-validates a family that trains in epochs)."""

    done: int
    total: int | None
    skipped: int = 0
    stage: str = "extract"


@dataclass
class ExtractResult:
    """What :func:`extract` did."""

    output: Path
    n_images: int
    n_computed: int
    n_reused: int
    n_removed: int
    written: bool
    identity: BackboneIdentity
    engine: str = ""
    shards: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def extract(
    data_dir: str | os.PathLike,
    output: str | os.PathLike = "features.h5",
    spec: BackboneSpec | None = None,
    run: RunOptions | None = None,
    *,
    files: Collection[str] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    **settings: Any,
) -> ExtractResult:
    """Embed every image under ``data_dir`` into the HDF5 cache ``output``.

    ``spec`` says what network makes the features, ``run`` where and how it runs, and
    ``settings`` are fields of those or of :class:`~featcache.settings.CacheOptions` by name
    (``backbone="efficientnet_lite0", layers="multi", engine="torch", overwrite=True``).

    An existing cache is updated incrementally (unchanged files are reused, new and modified
    files computed, deleted files dropped), and the settings not given (``backbone``,
    ``weights``, ``pool``, ``layers``, ``maps``, ``dtype``, ``precision``) are the ones it records;
    without a cache they default to ``mobilenet_v2``, its first weights, ``avg``, ``last``, no
    maps, ``float32`` and ``fp32``. ``layers`` (``last``, ``multi``, or stage indices and
    ``last``, as ``4,5,6,last``) chooses the layers whose pooled vectors are concatenated. With
    ``maps`` (a stage index, as in ``layers``), the cache also keeps that stage's unpooled maps
    (float16), for fine-tuning the network above it (``fit --model finetune``). A
    cache made with other settings, or from another folder, is an error unless ``overwrite``
    (a folder that was only moved, holding the same files, is reused). With ``files`` (paths
    relative to ``data_dir``), only those images are embedded and kept. Unreadable files are
    skipped and listed. ``engine`` and ``device`` choose what runs the backbone (see
    :func:`~featcache.backbones.build.build_backbone`). Ctrl-C raises
    :class:`~featcache.errors.Interrupted`; the images done so far are kept for the next run.
    With ``scheduler`` (``local``, ``local:N`` or ``tcp://HOST:PORT``), the images are embedded on
    a Dask cluster in shards of ``shard_size`` files (see :mod:`featcache.distributed`); with
    ``virtual``, the cache is an index whose features are HDF5 virtual datasets over the shards,
    which stay beside it (a shard whose files are unchanged is reused whole). Another process
    extracting into ``output`` meanwhile is an error naming it.
    """
    start = time.monotonic()
    spec, run, options = gather(
        "extract", settings, spec or BackboneSpec(), run or RunOptions(), CacheOptions()
    )
    if run.batch_size < 1 or run.workers < 0:
        raise FeatcacheError("batch_size must be at least 1 and workers at least 0")
    if options.virtual and run.scheduler is None:
        raise FeatcacheError("virtual=True indexes the shards of a cluster run: give a scheduler too")
    if spec.backbone is not None:
        get_entry(spec.backbone)  # a mistyped backbone is told before the folder is read
    if run.scheduler is not None:
        workers_to_start(run.scheduler)  # a mistyped scheduler is an error even when nothing is left to do
    output = writable_file(output)
    with locked(output, "extract"):
        return _extract(data_dir, output, spec, run, options, files, on_progress, start)


def _extract(
    data_dir: str | os.PathLike,
    output: Path,
    spec: BackboneSpec,
    run: RunOptions,
    options: CacheOptions,
    files: Collection[str] | None,
    on_progress: Callable[[Progress], None] | None,
    start: float,
) -> ExtractResult:
    previous = None if options.overwrite else _previous_cache(output)
    spec = spec.resolved(previous.identity if previous is not None else None)
    dtype = options.dtype or (previous.dtype if previous is not None else "float32")
    if dtype not in DTYPES:
        raise FeatcacheError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    dataset = scan(data_dir)
    if files is not None:
        dataset = dataset.subset(files)
    if previous is not None:
        _check_same_folder(previous, dataset, output)
    if not dataset.files:
        raise FeatcacheError(f"no images found under {data_dir}{_what_was_found(dataset)}")
    label_map = load_label_map(options.labels) if options.labels is not None else None

    from featcache.backbones.build import build_backbone

    def downloaded(done: int, total: int | None) -> None:
        if on_progress:
            on_progress(Progress(done, total, stage="download"))

    net = build_backbone(spec, run, on_download=downloaded)
    identity = net.identity
    if previous is not None:
        _check_same_settings(previous, identity, dtype, output)

    reusable = _reusable_rows(previous, dataset) if previous is not None else {}
    if run.scheduler is None:
        computed, failed, n_computed = _in_this_process(
            net, dataset, output, reusable, options.overwrite, run, on_progress
        )
        placed: dict[str, tuple[Path, int, int, int]] = {}
        shards = []
    else:
        placed, failed, n_computed, shards = _on_cluster(
            net, dataset, output, reusable, dtype, run, on_progress
        )
        computed = {}

    if label_map is None:
        label_map = previous.label_map if previous is not None else LabelMap()
    skipped = sorted([*dataset.unreadable, *failed.items()], key=lambda s: os.fsencode(s[0]))
    kept = [f for f in dataset.files if f.relpath in computed or f.relpath in placed or f.relpath in reusable]
    if not kept:
        _remove_work(output)
        raise FeatcacheError(
            f"no readable images under {data_dir}: {len(skipped)} file(s) skipped ({_first(skipped)})"
        )
    engines = set(filter(None, previous.engine.split(", "))) if previous is not None and reusable else set()
    engine = ", ".join(sorted(engines | ({net.engine} if computed or placed else set())))
    notes: list[str] = []
    if previous is None and run.scheduler is None:
        cache = assemble(dataset, identity, dtype, label_map, {}, computed, skipped)
        cache.engine = engine
        write_cache(cache, output)
        written = True
    else:
        found = _Found(reusable, computed, placed)
        listing = _listing(dataset, kept, identity, dtype, label_map, skipped, previous, found)
        listing.engine, listing.shards = engine, len(shards)
        written = previous is None or bool(computed or placed) or not previous.same_listing(listing)
        if written:
            rows = _locations(output, dataset, kept, identity, dtype, found, notes)
            write_index(listing, output, rows)
            if (previous is None and not options.virtual) or needs_compacting(rows, rows.counts()):
                compact(output)
    _remove_work(output)
    n_removed = 0 if previous is None else len(set(previous.paths) - {f.relpath for f in kept})
    return ExtractResult(
        output=output,
        n_images=len(kept),
        n_computed=n_computed,
        n_reused=len(kept) - n_computed,
        n_removed=n_removed,
        written=written,
        identity=identity,
        engine=net.engine,
        shards=len(shards),
        skipped=skipped,
        seconds=time.monotonic() - start,
        notes=notes,
    )


def _in_this_process(
    net: Embedder,
    dataset: Dataset,
    output: Path,
    reusable: dict[str, int],
    overwrite: bool,
    run: RunOptions,
    on_progress: Callable[[Progress], None] | None,
) -> tuple[dict[str, Row], dict[str, str], int]:
    """Embed what ``reusable`` lacks here, batch by batch, keeping each finished batch in the
    partial folder; return the rows, the files skipped and how many rows were computed now."""
    partial = _Partial(output, net.identity, dataset, reset=overwrite)
    finished = reusable.keys() | partial.rows.keys() | partial.skipped.keys()
    todo = [f for f in dataset.files if f.relpath not in finished]
    total = len(dataset.files)
    skipped_before = len(partial.skipped) + len(dataset.unreadable)
    done, n_computed, n_failed = total - len(todo), 0, 0
    if on_progress:
        on_progress(Progress(done, total, skipped_before))
    try:
        for rows, skipped in embed_files(net, dataset, todo, run.batch_size, run.workers):
            partial.add(rows, skipped)
            done += len(rows) + len(skipped)
            n_computed += len(rows)
            n_failed += len(skipped)
            if on_progress:
                on_progress(Progress(done, total, skipped_before + n_failed))
    except KeyboardInterrupt:
        raise Interrupted(
            f"{done} of {total} images done are kept; run the same extract again to resume"
        ) from None
    return partial.rows, partial.skipped, n_computed


def _on_cluster(
    net: Embedder,
    dataset: Dataset,
    output: Path,
    reusable: dict[str, int],
    dtype: str,
    run: RunOptions,
    on_progress: Callable[[Progress], None] | None,
) -> tuple[dict[str, tuple[Path, int, int, int]], dict[str, str], int, list]:
    """Embed what ``reusable`` lacks on a Dask cluster, in shards; return where each new row is
    (shard, row, file size, mtime), the files skipped, how many rows were computed now, and the
    shards."""
    from featcache import distributed

    todo = [f for f in dataset.files if f.relpath not in reusable]
    shards = distributed.plan(todo, net.identity, dtype, output, run.shard_size)
    total, state = (
        len(dataset.files),
        {"done": len(dataset.files) - len(todo), "skipped": len(dataset.unreadable)},
    )

    def shard_done(files: int, skipped: int) -> None:
        state["done"] += files
        state["skipped"] += skipped
        if on_progress:
            on_progress(Progress(state["done"], total, state["skipped"]))

    if on_progress:
        on_progress(Progress(state["done"], total, state["skipped"]))
    if not shards:
        return {}, {}, 0, []
    try:
        with distributed.dask_client(run.scheduler) as client:
            placed, skipped, computed = distributed.run(
                client, dataset, shards, net.identity, dtype, run, shard_done
            )
    except KeyboardInterrupt:
        raise Interrupted("the finished shards are kept; run the same extract again to resume") from None
    return placed, skipped, computed, shards


def _remove_work(output: Path) -> None:
    """Delete what unfinished runs and earlier updates left beside ``output``: partial batches, and
    the segments (shards) its index does not map."""
    shutil.rmtree(output.with_name(f".{output.name}.partial"), ignore_errors=True)
    if output.is_file():
        remove_unindexed(output)
    else:
        shutil.rmtree(segment_folder(output), ignore_errors=True)


def _previous_cache(output: Path) -> FeatureCache | None:
    """The cache already at ``output``, or None; anything else there is refused before any work."""
    if not output.exists():
        return None
    try:
        return read_cache(output, maps=True)
    except FeatcacheError as e:
        raise FeatcacheError(
            f"{e}; refusing to replace it (pass overwrite=True to replace it, or output=OTHER.h5 to write "
            "another file)"
        ) from None


def _check_same_folder(previous: FeatureCache, dataset: Dataset, output: Path) -> None:
    """Refuse a cache of another folder, unless this folder holds its files unchanged (it was moved)."""
    root = str(dataset.root.resolve())
    if not previous.data_root or previous.data_root == root:
        return
    current = {f.relpath: (f.size, f.mtime_ns) for f in dataset.files}
    moved = all(
        current.get(p) == (int(size), int(mtime))
        for p, size, mtime in zip(previous.paths, previous.sizes, previous.mtimes_ns, strict=True)
    )
    if not moved:
        raise CacheMismatchError(
            f"{output} holds the features of another folder ({previous.data_root}, not {root}): "
            "pass overwrite=True to replace them, or output=OTHER.h5 to write another file"
        )


def _check_same_settings(
    previous: FeatureCache, identity: BackboneIdentity, dtype: str, output: Path
) -> None:
    differences = previous.identity.differences(identity)
    if previous.dtype != dtype:
        differences.append(Difference("dtype", previous.dtype, dtype))
    why = ""
    if Difference("preprocessing.jpeg_draft", False, True) in differences:
        why = " (made before featcache decoded large JPEGs in draft mode, which moves pixels by a grey level)"
    if differences:
        raise CacheMismatchError(
            f"{output} holds features made differently ({worded(differences)}){why}: "
            "pass overwrite=True to replace it, or output=OTHER.h5 to write another file"
        )


def _what_was_found(dataset: Dataset) -> str:
    parts = []
    if dataset.ignored:
        parts.append(f"{dataset.ignored} file(s) that are not images")
    if dataset.unreadable:
        parts.append(f"{len(dataset.unreadable)} unreadable ({_first(dataset.unreadable)})")
    return f" ({', '.join(parts)})" if parts else " (the folder is empty)"


def _first(skipped: list[tuple[str, str]], n: int = 3) -> str:
    """The first ``n`` skipped files with their reasons, for one line."""
    return "; ".join(f"{p}: {r}" for p, r in skipped[:n]) + ("; …" if len(skipped) > n else "")


def _reusable_rows(previous: FeatureCache, dataset: Dataset) -> dict[str, int]:
    """The rows of ``previous`` (by path) whose files are unchanged: their row numbers there."""
    current = {f.relpath: (f.size, f.mtime_ns) for f in dataset.files}
    return {
        path: i
        for i, (path, size, mtime) in enumerate(zip(previous.paths, previous.sizes.tolist(),
                                                    previous.mtimes_ns.tolist(), strict=True))
        if current.get(path) == (size, mtime)
    }  # fmt: skip


@dataclass
class _Found:
    """Where this run has each file's row: ``reusable`` in the previous cache (its row number there),
    ``computed`` in this process, or ``placed`` in a cluster's shard (shard, row, size, mtime)."""

    reusable: dict[str, int]
    computed: dict[str, Row]
    placed: dict[str, tuple[Path, int, int, int]]


def _listing(
    dataset: Dataset,
    kept: list[ImageFile],
    identity: BackboneIdentity,
    dtype: str,
    label_map: LabelMap,
    skipped: list[tuple[str, str]],
    previous: FeatureCache | None,
    found: _Found,
) -> FeatureCache:
    """The cache's listing (no rows) of the files ``kept``, wherever their rows are."""
    signatures = []
    for f in kept:
        if f.relpath in found.computed:
            row = found.computed[f.relpath]
            signatures.append((row.size, row.mtime_ns))
        elif f.relpath in found.placed:
            signatures.append(found.placed[f.relpath][2:])
        else:
            i = found.reusable[f.relpath]
            signatures.append((int(previous.sizes[i]), int(previous.mtimes_ns[i])))
    sizes, mtimes = np.array(signatures, dtype=np.int64).reshape(-1, 2).T
    return FeatureCache(
        features=np.zeros((len(kept), 0), np.float32),
        labels=np.array([f.label for f in kept], dtype=np.int32),
        paths=[f.relpath for f in kept],
        sizes=sizes,
        mtimes_ns=mtimes,
        folders=dataset.folders,
        identity=identity,
        label_map=label_map,
        skipped=skipped,
        data_root=str(dataset.root.resolve()),
        dtype=dtype,
    )


def _locations(
    output: Path,
    dataset: Dataset,
    kept: list[ImageFile],
    identity: BackboneIdentity,
    dtype: str,
    found: _Found,
    notes: list[str],
) -> Locations:
    """Where each row of ``kept`` is: reused rows stay where the cache at ``output`` keeps them (a
    cache in one file becomes a segment by a hard link: nothing is copied), a cluster's rows stay in
    its shards, and rows computed here are written to a new segment."""
    folder = segment_folder(output)
    folder.mkdir(exist_ok=True)
    files: list[Path] = []
    where: dict[str, tuple[int, int]] = {}
    reusable, computed, placed = found.reusable, found.computed, found.placed
    if reusable:
        before = locations(output)
        if before.files == [output]:
            before = Locations([_as_segment(output, notes)], before.segment, before.offset)
        files += before.files
        where.update({p: (int(before.segment[i]), int(before.offset[i])) for p, i in reusable.items()})
    for path, (shard, offset, _, _) in placed.items():
        if shard not in files:
            files.append(shard)
        where[path] = (files.index(shard), offset)
    if computed:
        new = assemble(dataset, identity, dtype, LabelMap(), {}, computed, [])
        key = digest(new.paths, new.sizes.tolist(), new.mtimes_ns.tolist(), length=16)
        segment = folder / f"segment-{key}.h5"
        write_cache(new, segment)
        files.append(segment)
        where.update({p: (len(files) - 1, i) for i, p in enumerate(new.paths)})
    segment = np.array([where[f.relpath][0] for f in kept], dtype=np.int32)
    offset = np.array([where[f.relpath][1] for f in kept], dtype=np.int64)
    return Locations([f.resolve() for f in files], segment, offset)


def _as_segment(output: Path, notes: list[str]) -> Path:
    """Make the one-file cache at ``output`` (its rows inside) the first segment of its update: a
    hard link (a copy where links are not allowed) in its segment folder, renamed into place."""
    with h5py.File(output, "r") as f:
        version = int(f.attrs["format_version"])
    segment = segment_folder(output) / f"base-{uuid.uuid4().hex[:16]}.h5"
    tmp = segment.with_name(f".{segment.name}.tmp-{os.getpid()}")
    try:
        os.link(output, tmp)
    except OSError:
        shutil.copyfile(output, tmp)
    os.replace(tmp, segment)
    shards, command = segment_folder(output).name, f"featcache compact {shlex.quote(str(output))}"
    notes.append(
        f"{output.name} was a cache of format {version} in one file: it is now an index of format "
        f"{FORMAT_VERSION} over segments in {shards}/ beside it (nothing was copied; keep the folder with "
        f"it; {command} copies the rows back into one file)"
        if version < FORMAT_VERSION
        else f"{output.name} now indexes its rows in segments in {shards}/ beside it (keep the folder "
        f"with it; {command} copies them back into one file)"
    )
    return segment


class _Partial:
    """Finished batches of an unfinished run, kept next to the output as whole ``.npz`` files.

    Made for one backbone identity and data folder: parts left by a run with other ones are
    deleted, and ``rows`` and ``skipped`` hold what earlier runs finished on files that have
    not changed since.
    """

    def __init__(self, output: Path, identity: BackboneIdentity, dataset: Dataset, reset: bool):
        self.folder = output.with_name(f".{output.name}.partial")
        self.key = digest(identity, str(dataset.root.resolve()))
        meta = self.folder / "identity.json"
        if self.folder.exists() and (reset or not meta.is_file() or meta.read_text() != self.key):
            shutil.rmtree(self.folder, ignore_errors=True)
        self.files = {f.relpath: f for f in dataset.files}
        self.rows: dict[str, Row] = {}
        self.skipped: dict[str, str] = {}
        self.seq = 0
        if self.folder.is_dir():
            for part in sorted(self.folder.glob("part-*.npz")):
                self._load(part)

    def _unchanged(self, path: str, size: int, mtime: int) -> ImageFile | None:
        f = self.files.get(path)
        return f if f is not None and (f.size, f.mtime_ns) == (int(size), int(mtime)) else None

    def _load(self, part: Path) -> None:
        try:
            with np.load(part, allow_pickle=False) as z:
                paths = [os.fsdecode(bytes(p)) for p in z["paths"]]
                maps = z["maps"] if "maps" in z else [None] * len(paths)
                columns = zip(paths, z["sizes"], z["mtimes"], z["features"], maps, strict=True)
                for p, size, mtime, feat, kept in columns:
                    if (f := self._unchanged(p, size, mtime)) is not None:
                        self.rows[p] = Row(f.size, f.mtime_ns, feat, kept)
                skipped = [os.fsdecode(bytes(p)) for p in z["skipped_paths"]]
                signature = zip(z["skipped_reasons"], z["skipped_sizes"], z["skipped_mtimes"], strict=True)
                for p, (reason, size, mtime) in zip(skipped, signature, strict=True):
                    if self._unchanged(p, size, mtime) is not None:
                        self.skipped[p] = str(reason)
        except (OSError, ValueError, KeyError, EOFError):
            return  # a part damaged by a crash is simply recomputed
        self.seq = max(self.seq, int(part.stem.split("-")[1]))

    def add(self, rows: dict[str, Row], skipped: dict[str, str]) -> None:
        """Save one finished batch as a new part file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "identity.json"
        if not meta.is_file():
            tmp_meta = meta.with_suffix(".tmp")
            tmp_meta.write_text(self.key)
            os.replace(tmp_meta, meta)
        self.seq += 1
        part = self.folder / f"part-{self.seq:06d}.npz"
        tmp = self.folder / f".{part.name}.tmp"
        dim = next(iter(rows.values())).features.shape[0] if rows else 0
        features = np.stack([r.features for r in rows.values()]) if rows else np.zeros((0, dim), np.float32)
        kept = [r.maps for r in rows.values() if r.maps is not None]
        maps = {"maps": np.stack(kept)} if kept and len(kept) == len(rows) else {}
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                paths=np.array([os.fsencode(p) for p in rows], dtype=bytes),
                sizes=np.array([r.size for r in rows.values()], dtype=np.int64),
                mtimes=np.array([r.mtime_ns for r in rows.values()], dtype=np.int64),
                features=features,
                skipped_paths=np.array([os.fsencode(p) for p in skipped], dtype=bytes),
                skipped_reasons=np.array(list(skipped.values()), dtype=str),
                skipped_sizes=np.array([self.files[p].size for p in skipped], dtype=np.int64),
                skipped_mtimes=np.array([self.files[p].mtime_ns for p in skipped], dtype=np.int64),
                **maps,
            )
        os.replace(tmp, part)
        self.rows.update(rows)
        self.skipped.update(skipped)
