"""``extract``: run a backbone over every image of a folder once and keep the embeddings.

The work is resumable: finished batches are saved as small files in a ``.<output>.partial``
folder (each written whole, then renamed), and the cache itself is replaced in one rename at
the end. A run killed at any moment leaves the previous cache intact and its finished batches
reusable by the next run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.backbones import Backbone, BackboneIdentity, backbone_for, load_backbone, resolve_device
from featcache.cache import DTYPES, FeatureCache, read_cache, write_cache
from featcache.dataset import Dataset, ImageFile, LabelMap, load_label_map, scan
from featcache.errors import CacheMismatchError, FeatcacheError
from featcache.images import load_batches


@dataclass
class Progress:
    """Reported after each batch: images handled so far out of ``total``, and how many were skipped."""

    done: int
    total: int
    skipped: int


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
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def extract(
    data_dir: str | os.PathLike,
    output: str | os.PathLike = "features.h5",
    backbone: str = "mobilenet_v2",
    weights: str | None = None,
    pool: str = "avg",
    dtype: str = "float32",
    precision: str = "fp32",
    labels: str | os.PathLike | None = None,
    batch_size: int = 32,
    workers: int = 2,
    device: str = "auto",
    overwrite: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> ExtractResult:
    """Embed every image under ``data_dir`` into the HDF5 cache ``output``.

    An existing cache made with the same backbone identity and dtype is updated incrementally
    (unchanged files are reused, new and modified files computed, deleted files dropped); one
    made differently is an error unless ``overwrite``. Unreadable files are skipped and listed.
    ``precision`` is the backbone's arithmetic: ``fp32`` or ``bf16`` autocast.
    """
    start = time.monotonic()
    if dtype not in DTYPES:
        raise FeatcacheError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if batch_size < 1 or workers < 0:
        raise FeatcacheError("batch size must be at least 1 and workers at least 0")
    output = Path(output)
    dataset = scan(data_dir)
    label_map = load_label_map(labels) if labels is not None else None
    net = load_backbone(
        backbone, weights, pool=pool, device=resolve_device(device), progress=True, precision=precision
    )
    identity = net.identity

    previous = None if overwrite else _previous_cache(output, identity, dtype)
    partial = _Partial(output, identity, reset=overwrite)
    reusable = _reusable_rows(previous, dataset) if previous is not None else {}
    resumed = partial.load(dataset)
    finished = reusable.keys() | resumed.rows.keys() | resumed.skipped.keys()
    todo = [f for f in dataset.files if f.relpath not in finished]

    total = len(dataset.files)
    skipped_before = len(resumed.skipped) + len(dataset.unreadable)
    done, n_computed, n_failed = total - len(todo), 0, 0
    if on_progress:
        on_progress(Progress(done, total, skipped_before))
    for rows, skipped in _embed(net, dataset, todo, batch_size, workers):
        partial.add(rows, skipped)
        resumed.rows.update(rows)
        resumed.skipped.update(skipped)
        done += len(rows) + len(skipped)
        n_computed += len(rows)
        n_failed += len(skipped)
        if on_progress:
            on_progress(Progress(done, total, skipped_before + n_failed))

    if label_map is None:
        label_map = previous.label_map if previous is not None else LabelMap()
    skipped = sorted([*dataset.unreadable, *resumed.skipped.items()], key=lambda s: os.fsencode(s[0]))
    cache = _assemble(dataset, identity, dtype, label_map, reusable, resumed.rows, skipped)
    n_removed = 0 if previous is None else len(set(previous.paths) - set(cache.paths))
    written = previous is None or not previous.same_content(cache)
    if written:
        write_cache(cache, output)
    partial.remove()
    return ExtractResult(
        output=output,
        n_images=len(cache),
        n_computed=n_computed,
        n_reused=len(cache) - n_computed,
        n_removed=n_removed,
        written=written,
        identity=identity,
        skipped=skipped,
        seconds=time.monotonic() - start,
    )


_Row = tuple[int, int, np.ndarray]  # file size, mtime_ns, embedding


def _previous_cache(output: Path, identity: BackboneIdentity, dtype: str) -> FeatureCache | None:
    if not output.exists():
        return None
    try:
        previous = read_cache(output)
    except FeatcacheError as e:
        raise FeatcacheError(f"{e}; refusing to replace it (use --overwrite, or -o another file)") from None
    differences = previous.identity.differences(identity)
    if previous.dtype != dtype:
        differences.append(f"dtype: {previous.dtype} vs {dtype}")
    if differences:
        raise CacheMismatchError(
            f"{output} holds features made differently ({'; '.join(differences)}): "
            "use --overwrite to replace it, or -o to write another file"
        )
    return previous


def _reusable_rows(previous: FeatureCache, dataset: Dataset) -> dict[str, _Row]:
    current = {f.relpath: f for f in dataset.files}
    rows = {}
    for i, path in enumerate(previous.paths):
        f = current.get(path)
        if f is not None and (f.size, f.mtime_ns) == (int(previous.sizes[i]), int(previous.mtimes_ns[i])):
            rows[path] = (f.size, f.mtime_ns, previous.features[i].astype(np.float32))
    return rows


def _embed(
    net: Backbone, dataset: Dataset, todo: list[ImageFile], batch_size: int, workers: int
) -> Iterator[tuple[dict[str, _Row], dict[str, str]]]:
    """Yield ``(rows, skipped)`` per batch; decoding of the next batches overlaps with the model."""
    sources = [dataset.path(f.relpath) for f in todo]
    loaded = load_batches(sources, net.preprocessing, batch_size, workers)
    for start, pixels in zip(range(0, len(todo), batch_size), loaded, strict=True):
        yield _run_batch(net, todo[start : start + batch_size], pixels)


def _run_batch(
    net: Backbone, batch: list[ImageFile], loaded: list[np.ndarray | str]
) -> tuple[dict[str, _Row], dict[str, str]]:
    good = [(f, px) for f, px in zip(batch, loaded, strict=True) if not isinstance(px, str)]
    skipped = {f.relpath: px for f, px in zip(batch, loaded, strict=True) if isinstance(px, str)}
    rows: dict[str, _Row] = {}
    if good:
        feats = net.embed(np.stack([px for _, px in good]))
        rows = {f.relpath: (f.size, f.mtime_ns, feats[i]) for i, (f, _) in enumerate(good)}
    return rows, skipped


def _assemble(
    dataset: Dataset,
    identity: BackboneIdentity,
    dtype: str,
    label_map: LabelMap,
    reusable: dict[str, _Row],
    computed: dict[str, _Row],
    skipped: list[tuple[str, str]],
) -> FeatureCache:
    files = [f for f in dataset.files if f.relpath in reusable or f.relpath in computed]
    rows = [computed.get(f.relpath) or reusable[f.relpath] for f in files]
    features = np.stack([r[2] for r in rows]) if rows else np.zeros((0, identity.feature_dim), np.float32)
    return FeatureCache(
        features=features.astype(dtype),
        labels=np.array([f.label for f in files], dtype=np.int32),
        paths=[f.relpath for f in files],
        sizes=np.array([r[0] for r in rows], dtype=np.int64),
        mtimes_ns=np.array([r[1] for r in rows], dtype=np.int64),
        classes=dataset.classes,
        identity=identity,
        label_map=label_map,
        skipped=skipped,
        data_root=str(dataset.root.resolve()),
        dtype=dtype,
    )


@dataclass
class _Resumed:
    rows: dict[str, _Row] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


class _Partial:
    """Finished batches of an unfinished run, kept next to the output as whole ``.npz`` files."""

    def __init__(self, output: Path, identity: BackboneIdentity, reset: bool):
        self.folder = output.with_name(f".{output.name}.partial")
        self.identity = json.dumps(identity.to_dict(), sort_keys=True)
        meta = self.folder / "identity.json"
        if self.folder.exists() and (reset or not meta.is_file() or meta.read_text() != self.identity):
            shutil.rmtree(self.folder, ignore_errors=True)
        self.seq = 0

    def load(self, dataset: Dataset) -> _Resumed:
        """Rows and skip records of earlier unfinished runs whose files have not changed since."""
        resumed = _Resumed()
        current = self._files = {f.relpath: f for f in dataset.files}
        if not self.folder.is_dir():
            return resumed
        for part in sorted(self.folder.glob("part-*.npz")):
            try:
                with np.load(part, allow_pickle=False) as z:
                    paths = [os.fsdecode(bytes(p)) for p in z["paths"]]
                    sizes, mtimes, feats = z["sizes"], z["mtimes"], z["features"]
                    skipped = zip(
                        [os.fsdecode(bytes(p)) for p in z["skipped_paths"]], z["skipped_reasons"], strict=True
                    )
                    skip_sig = zip(z["skipped_sizes"], z["skipped_mtimes"], strict=True)
                    for i, p in enumerate(paths):
                        f = current.get(p)
                        if f is not None and (f.size, f.mtime_ns) == (int(sizes[i]), int(mtimes[i])):
                            resumed.rows[p] = (f.size, f.mtime_ns, feats[i])
                    for (p, reason), (size, mtime) in zip(skipped, skip_sig, strict=True):
                        f = current.get(p)
                        if f is not None and (f.size, f.mtime_ns) == (int(size), int(mtime)):
                            resumed.skipped[p] = str(reason)
            except (OSError, ValueError, KeyError, EOFError):
                continue  # a part damaged by a crash is simply recomputed
            self.seq = max(self.seq, int(part.stem.split("-")[1]))
        return resumed

    def add(self, rows: dict[str, _Row], skipped: dict[str, str]) -> None:
        """Save one finished batch as a new part file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "identity.json"
        if not meta.is_file():
            tmp_meta = meta.with_suffix(".tmp")
            tmp_meta.write_text(self.identity)
            os.replace(tmp_meta, meta)
        self.seq += 1
        files = self._files
        part = self.folder / f"part-{self.seq:06d}.npz"
        tmp = self.folder / f".{part.name}.tmp"
        dim = next(iter(rows.values()))[2].shape[0] if rows else 0
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                paths=np.array([os.fsencode(p) for p in rows], dtype=bytes),
                sizes=np.array([r[0] for r in rows.values()], dtype=np.int64),
                mtimes=np.array([r[1] for r in rows.values()], dtype=np.int64),
                features=np.stack([r[2] for r in rows.values()]) if rows else np.zeros((0, dim), np.float32),
                skipped_paths=np.array([os.fsencode(p) for p in skipped], dtype=bytes),
                skipped_reasons=np.array(list(skipped.values()), dtype=str),
                skipped_sizes=np.array([files[p].size for p in skipped], dtype=np.int64),
                skipped_mtimes=np.array([files[p].mtime_ns for p in skipped], dtype=np.int64),
            )
        os.replace(tmp, part)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def embed_folder(
    data_dir: str | os.PathLike,
    identity: BackboneIdentity,
    batch_size: int = 32,
    workers: int = 2,
    device: str = "auto",
) -> FeatureCache:
    """Embed a folder in memory with the backbone described by ``identity`` (nothing is written)."""
    dataset = scan(data_dir)
    net = backbone_for(identity, device=resolve_device(device))
    rows: dict[str, _Row] = {}
    skipped = dict(dataset.unreadable)
    for batch_rows, batch_skipped in _embed(net, dataset, dataset.files, batch_size, workers):
        rows.update(batch_rows)
        skipped.update(batch_skipped)
    listing = sorted(skipped.items(), key=lambda s: os.fsencode(s[0]))
    return _assemble(dataset, identity, "float32", LabelMap(), {}, rows, listing)
