"""The HDF5 feature cache: one file with the embeddings and everything that identifies them.

A cache is one file (``features.h5``) that holds its rows' metadata and either the rows
themselves or HDF5 virtual datasets over *segments*: immutable cache files in the folder
``features.h5.shards`` beside it, each holding the rows one update added (or a Dask shard). An
update writes its new rows as a new segment and then a new index, each whole to a temporary name
renamed into place, so a reader (or a killed writer) only ever sees the previous complete cache
or the new one; segments no longer indexed are deleted afterwards. :func:`compact` copies the
rows back into one file. Features and maps are read only when asked (:class:`Rows`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featcache._version import __version__
from featcache.backbones.identity import BackboneIdentity
from featcache.choices import DTYPES
from featcache.dataset import LabelMap
from featcache.errors import FeatcacheError
from featcache.files import replaced_atomically

FORMAT = "featcache-features"
#: 1: the rows in the file, or (Dask ``--virtual``) virtual features over whole shards;
#: 2: also virtual features and maps over runs of rows of segments, as appends leave them.
FORMAT_VERSION = 2
#: An update copies the rows into one file when more than this share of the segments' rows is
#: no longer indexed (files deleted or changed), or when the cache has more than
#: ``COMPACT_SEGMENTS`` segments or ``COMPACT_RUNS`` runs of rows.
COMPACT_DEAD_SHARE = 0.25
COMPACT_SEGMENTS = 64
COMPACT_RUNS = 4096


def segment_folder(path: Path) -> Path:
    """The folder of the segments of the cache at ``path``: ``<path>.shards``."""
    return path.with_name(path.name + ".shards")


class RowView:
    """Some rows of a :class:`Rows`, read only when asked: ``np.asarray(view)`` reads them; indexing
    with a slice, mask or indices gives another view (so scikit-learn's cross-validation splits it
    without reading), an integer gives that row. Fine-tuning streams its maps from disk this way."""

    def __init__(self, rows: Rows, index: np.ndarray):
        self.rows, self.index = rows, index
        self.shape = (len(index), *rows.shape[1:])
        self.dtype = rows.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"<RowView of {len(self)} {self.rows.name} rows of {self.rows.path}>"

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, np.integer)):
            return self.rows.read(self.index[[key]])[0]
        return RowView(self.rows, self.index[key])

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self.rows.read(self.index)
        return out if dtype is None else out.astype(dtype, copy=False)


class Rows:
    """The features or maps of a cache file, read from it when asked: ``rows[i]``, ``rows[a:b]``,
    ``rows[mask]``, ``rows[indices]`` read those rows only; ``np.asarray(rows)`` reads all of them
    (once). They are read through the file handle :func:`read_cache` opened, so an update that
    replaces the file meanwhile does not change them; once that handle is gone (a copy sent to
    another process), a file replaced since is an error, never other rows."""

    def __init__(
        self, path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype, generation: str,
        handle: h5py.File | None = None,
    ):  # fmt: skip
        self.path, self.name, self.shape, self.dtype = path, name, tuple(shape), np.dtype(dtype)
        self._generation = generation
        self._handle = handle
        self._all: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None}

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"<Rows {self.name} {self.shape} {self.dtype} of {self.path}>"

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if self._all is None:
            self._all = self._read(slice(0, len(self)))
        return self._all if dtype is None else self._all.astype(dtype, copy=False)

    def astype(self, dtype: Any, copy: bool = True) -> np.ndarray:
        return np.asarray(self).astype(dtype, copy=copy)

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if self._all is not None:
            out = self._all[key]
        elif isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {key} of {len(self)}")
            out = self._read(slice(i, i + 1))[0]
        elif isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            out = self._read(slice(start, stop)) if step == 1 else self.read(np.arange(start, stop, step))
        else:
            index = np.asarray(key)
            out = self.read(np.flatnonzero(index) if index.dtype == bool else index)
        return out[(slice(None), *rest)] if rest and np.ndim(out) > 0 else out

    def view(self, rows: np.ndarray) -> RowView:
        """These rows, still unread: a :class:`RowView`."""
        return RowView(self, np.asarray(rows, dtype=np.int64))

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The rows of these indices (any order, repeats allowed), reading only those."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if self._all is not None:
            return self._all[rows]
        if len(rows) == 0:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        rows = np.where(rows < 0, rows + len(self), rows)
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"row index out of range for {len(self)} rows")
        wanted, back = np.unique(rows, return_inverse=True)
        lo, hi = int(wanted[0]), int(wanted[-1]) + 1
        if hi - lo <= 2 * len(wanted):  # dense enough: one read of the span
            return self._read(slice(lo, hi))[wanted - lo][back]
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(wanted, breaks)]
        return self._read(*[slice(a, b) for a, b in runs])[back]

    def _read(self, *spans: slice) -> np.ndarray:
        try:
            if self._handle is not None and self._handle.id.valid:
                dataset = self._handle[self.name]
                parts, virtual = [dataset[s] for s in spans], dataset.is_virtual
            else:
                with h5py.File(self.path, "r") as f:
                    if str(f.attrs.get("generation", "")) != self._generation:
                        raise FeatcacheError(f"{self.path} was replaced since it was read; read it again")
                    dataset = f[self.name]
                    parts, virtual = [dataset[s] for s in spans], dataset.is_virtual
        except OSError as e:
            raise FeatcacheError(f"{self.path}: cannot read its {self.name} ({e})") from None
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if virtual and np.isnan(out).any():
            _check_segments(self.path)
            raise FeatcacheError(
                f"{self.path}: a segment behind it is damaged (NaN {self.name}); rerun the extract"
            )
        return out


@dataclass(frozen=True)
class CacheSummary:
    """How many images a cache holds (labelled or not), of how many classes, its size (the file and
    its segments), for a cache with maps their stage, shape (C, h, w) and KiB per image (float16),
    and for a cache whose rows are in segments, how many, and the share of their rows it no
    longer indexes."""

    n_images: int
    n_labelled: int
    n_classes: int
    size_bytes: int
    kib_per_image: float
    maps: tuple[int, tuple[int, int, int], float] | None = None
    segments: int = 0
    unindexed_share: float = 0.0


@dataclass
class FeatureCache:
    """The contents of a feature cache.

    Row ``i`` is the image ``paths[i]`` (relative to ``data_root``, ``/``-separated), with class
    index ``labels[i]`` into the class folder names ``folders`` (-1 when unlabelled), embedding
    ``features[i]``, and the file's ``sizes[i]``/``mtimes_ns[i]`` when it was read. ``skipped``
    lists ``(path, reason)``. ``engine`` names what computed the features (``openvino``,
    ``torch``, or both, comma-separated); it is recorded, not compared, as the engines' fp32
    features are interchangeable. ``shards`` is how many shards a Dask cluster computed (0: one
    process). ``maps`` (float16, N×C×h×w) holds the unpooled maps of stage ``identity.maps`` when
    the cache keeps them. In a cache from :func:`read_cache`, ``features`` and ``maps`` are
    :class:`Rows`, read from the file ``path`` when asked. ``changes`` says what was changed in
    memory since it was read (e.g. labels corrected), and is not written.
    """

    features: np.ndarray | Rows
    labels: np.ndarray
    paths: list[str]
    sizes: np.ndarray
    mtimes_ns: np.ndarray
    folders: list[str]
    identity: BackboneIdentity
    label_map: LabelMap = field(default_factory=LabelMap)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    data_root: str = ""
    dtype: str = "float32"
    engine: str = ""
    shards: int = 0
    created: str = ""
    featcache_version: str = __version__
    maps: np.ndarray | Rows | None = field(default=None, repr=False)
    path: Path | None = None
    changes: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def names(self) -> list[str]:
        """Display names of the classes (from the label map when there is one)."""
        return [self.label_map.display(c) for c in self.folders]

    def load(self) -> FeatureCache:
        """Read the features (and maps) into memory now and close the file, which the cache no longer
        needs; returns the cache."""
        handles = {getattr(rows, "_handle", None) for rows in (self.features, self.maps)} - {None}
        self.features = np.asarray(self.features)
        if self.maps is not None:
            self.maps = np.asarray(self.maps)
        for handle in handles:
            handle.close()
        return self

    def labelled(
        self, paths: Collection[str] | None = None, maps: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """The float32 features (with ``maps``: the float16 maps, as a :class:`RowView` still on disk
        when the cache was read from a file) of the labelled rows (of ``paths`` only, when given)
        and their class folder names."""
        mask = self.labels >= 0
        if paths is not None:
            wanted = set(paths)
            mask &= np.array([p in wanted for p in self.paths], dtype=bool)
        folders = np.array(self.folders, dtype=object)
        if maps and self.maps is None:
            raise FeatcacheError("this cache keeps no feature maps: extract with --maps STAGE")
        if maps:
            X = self.maps.view(np.flatnonzero(mask)) if isinstance(self.maps, Rows) else self.maps[mask]
        else:
            X = self.features[mask].astype(np.float32)
        return X, folders[self.labels[mask]].astype(str)

    def same_content(self, other: FeatureCache) -> bool:
        """Whether ``other`` holds the same rows, files, class folders, skip records and labels (the
        creation time and featcache version aside)."""
        return (
            self.same_listing(other)
            and np.array_equal(self.features, other.features)
            and (self.maps is None) == (other.maps is None)
            and (self.maps is None or np.array_equal(self.maps, other.maps))
        )

    def same_listing(self, other: FeatureCache) -> bool:
        """Whether ``other`` lists the same files, class folders, labels, skip records and label map,
        whatever their features (which this does not read)."""
        return (
            self.paths == other.paths
            and self.folders == other.folders
            and self.skipped == other.skipped
            and self.label_map == other.label_map
            and self.data_root == other.data_root
            and np.array_equal(self.labels, other.labels)
            and np.array_equal(self.sizes, other.sizes)
            and np.array_equal(self.mtimes_ns, other.mtimes_ns)
        )

    def summary(self) -> CacheSummary:
        """Counts and sizes, as ``featcache info`` shows them."""
        from featcache.backbones.registry import get_entry

        n = len(self)
        size = stored_bytes(self.path) if self.path is not None and self.path.is_file() else 0
        maps = None
        if self.identity.maps is not None:
            shape = get_entry(self.identity.backbone).maps_shape(self.identity.maps)
            maps = (self.identity.maps, shape, math.prod(shape) * 2 / 1024)
        segments, unindexed = 0, 0.0
        if self.features_virtual():
            rows = locations(self.path)
            stored = sum(rows.counts())
            segments, unindexed = len(rows.files), 1 - n / stored if stored else 0.0
        return CacheSummary(
            n_images=n,
            n_labelled=int((self.labels >= 0).sum()),
            n_classes=len(self.folders),
            size_bytes=size,
            kib_per_image=size / n / 1024 if n else 0.0,
            maps=maps,
            segments=segments,
            unindexed_share=unindexed,
        )

    def features_virtual(self) -> bool:
        """Whether the rows of the file this cache was read from live in segments beside it."""
        if self.path is None or not self.path.is_file():
            return False
        with h5py.File(self.path, "r") as f:
            return bool(f["features"].is_virtual)

    def class_counts(self) -> dict[str, int]:
        """Labelled images per class folder."""
        counts = np.bincount(self.labels[self.labels >= 0], minlength=len(self.folders))
        return dict(zip(self.folders, counts.tolist(), strict=True))


def _encode(paths: list[str]) -> np.ndarray:
    raw = [os.fsencode(p) for p in paths]
    width = max((len(r) for r in raw), default=1) or 1
    return np.array(raw, dtype=f"S{width}")


def _decode(arr: np.ndarray) -> list[str]:
    return [os.fsdecode(bytes(b)) for b in arr]


def write_cache(cache: FeatureCache, path: str | os.PathLike) -> None:
    """Write ``cache`` whole, its rows in the file, to ``path`` atomically (temporary file, fsync,
    rename). The rows are copied in blocks, so a cache read from a file is never loaded whole."""
    path = Path(path)
    _check_writable(cache)
    with replaced_atomically(path) as tmp:
        with h5py.File(tmp, "w") as f:
            dim = cache.identity.feature_dim if len(cache) == 0 else cache.features.shape[1]
            features = f.create_dataset("features", shape=(len(cache), dim), dtype=cache.dtype)
            maps = None
            if cache.maps is not None:
                shape = cache.maps.shape[1:]
                chunks = (1, *shape) if len(cache) else None
                maps = f.create_dataset("maps", shape=(len(cache), *shape), dtype=np.float16, chunks=chunks)
            _copy_rows(cache, features, maps)
            _write_listing(f, cache)


def write_index(cache: FeatureCache, path: str | os.PathLike, rows: Locations) -> None:
    """Write the index ``path`` of ``cache``: its listing, and features (and maps) that are HDF5
    virtual datasets over the segment rows ``rows`` (one per cache row, in order), which are not
    read. Atomic, like :func:`write_cache`."""
    path = Path(path)
    if cache.dtype not in DTYPES:
        raise FeatcacheError(f"dtype must be one of {DTYPES}, got {cache.dtype!r}")
    if len(rows) != len(cache):
        raise FeatcacheError(f"an index of {len(cache)} rows needs as many locations, got {len(rows)}")
    with replaced_atomically(path) as tmp:
        with h5py.File(tmp, "w") as f:
            counts = rows.counts()
            dim = cache.identity.feature_dim
            layout = rows.layout(path.parent, "features", (dim,), cache.dtype, counts)
            f.create_virtual_dataset("features", layout, fillvalue=np.nan)
            if cache.identity.maps is not None:
                from featcache.backbones.registry import get_entry

                shape = get_entry(cache.identity.backbone).maps_shape(cache.identity.maps)
                layout = rows.layout(path.parent, "maps", shape, np.float16, counts)
                f.create_virtual_dataset("maps", layout, fillvalue=np.nan)
            _write_listing(f, cache)


@dataclass(frozen=True)
class Locations:
    """Where rows are stored: row ``i`` is row ``offset[i]`` of the cache file ``files[segment[i]]``."""

    files: list[Path]
    segment: np.ndarray
    offset: np.ndarray

    def __len__(self) -> int:
        return len(self.segment)

    def runs(self) -> list[tuple[int, int, int, int]]:
        """``(segment, offset, start, stop)``: rows ``start:stop`` are consecutive rows of one segment."""
        n = len(self)
        if n == 0:
            return []
        cut = np.flatnonzero((np.diff(self.segment) != 0) | (np.diff(self.offset) != 1)) + 1
        starts, stops = np.concatenate([[0], cut]), np.concatenate([cut, [n]])
        return [
            (int(self.segment[a]), int(self.offset[a]), int(a), int(b))
            for a, b in zip(starts, stops, strict=True)
        ]

    def counts(self) -> list[int]:
        """How many rows each segment file holds (all of them, indexed or not)."""
        counts = []
        for f in self.files:
            try:
                with h5py.File(f, "r") as h:
                    counts.append(h["features"].shape[0])
            except (OSError, KeyError) as e:
                raise FeatcacheError(f"segment {f} is unreadable ({e})") from None
        return counts

    def layout(
        self, folder: Path, name: str, shape: tuple[int, ...], dtype: Any, counts: list[int]
    ) -> h5py.VirtualLayout:
        layout = h5py.VirtualLayout(shape=(len(self), *shape), dtype=dtype)
        sources = [
            h5py.VirtualSource(os.path.relpath(f, folder), name, shape=(n, *shape))
            for f, n in zip(self.files, counts, strict=True)
        ]
        for segment, offset, start, stop in self.runs():
            layout[start:stop] = sources[segment][offset : offset + stop - start]
        return layout


def locations(path: str | os.PathLike) -> Locations:
    """Where the rows of the cache at ``path`` are stored (reading no rows): in the file itself, or in
    the segments its virtual datasets map."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        dataset = f["features"]
        n = dataset.shape[0]
        if not dataset.is_virtual:
            return Locations([path], np.zeros(n, np.int32), np.arange(n, dtype=np.int64))
        files: list[Path] = []
        segment = np.full(n, -1, np.int32)
        offset = np.zeros(n, np.int64)
        for source in dataset.virtual_sources():
            file = (path.parent / source.file_name).resolve()
            if file not in files:
                files.append(file)
            (v0, _), (v1, _) = source.vspace.get_select_bounds()
            (s0, _), (s1, _) = source.src_space.get_select_bounds()
            if v1 - v0 != s1 - s0:
                raise FeatcacheError(f"{path}: a virtual mapping of {source.file_name} is not row for row")
            segment[v0 : v1 + 1] = files.index(file)
            offset[v0 : v1 + 1] = np.arange(s0, s1 + 1)
        if (segment < 0).any():
            raise FeatcacheError(f"{path}: some of its rows are mapped to no segment")
    return Locations(files, segment, offset)


def _check_writable(cache: FeatureCache) -> None:
    if cache.identity.maps is not None and (cache.maps is None or len(cache.maps) != len(cache)):
        raise FeatcacheError("a cache whose identity keeps maps needs one row of maps per image")
    if cache.dtype not in DTYPES:
        raise FeatcacheError(f"dtype must be one of {DTYPES}, got {cache.dtype!r}")


def _copy_rows(
    cache: FeatureCache, features: h5py.Dataset, maps: h5py.Dataset | None, block: int = 8192
) -> None:
    """Copy ``cache``'s rows into the new datasets, a block at a time (maps in smaller blocks)."""
    step = block if maps is None else max(1, block // 32)
    for start in range(0, len(cache), step):
        stop = min(start + step, len(cache))
        features[start:stop] = np.asarray(cache.features[start:stop]).astype(cache.dtype, copy=False)
        if maps is not None:
            maps[start:stop] = np.asarray(cache.maps[start:stop]).astype(np.float16, copy=False)


def _write_listing(f: h5py.File, cache: FeatureCache) -> None:
    """Everything but the rows: labels, paths, file signatures, classes, skipped files, attributes."""
    str_dt = h5py.string_dtype()
    f.create_dataset("labels", data=np.asarray(cache.labels, dtype=np.int32))
    f.create_dataset("paths", data=_encode(cache.paths))
    f.create_dataset("file_size", data=np.asarray(cache.sizes, dtype=np.int64))
    f.create_dataset("file_mtime_ns", data=np.asarray(cache.mtimes_ns, dtype=np.int64))
    f.create_dataset("classes", data=np.array(cache.folders, dtype=object), dtype=str_dt)
    g = f.create_group("skipped")
    g.create_dataset("paths", data=_encode([p for p, _ in cache.skipped]))
    reasons = np.array([r for _, r in cache.skipped], dtype=object)
    g.create_dataset("reasons", data=reasons, dtype=str_dt)
    ident = cache.identity
    f.attrs.update(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "generation": uuid.uuid4().hex,
            "identity": json.dumps(ident.to_dict(), sort_keys=True),
            "backbone": ident.backbone,
            "weights": ident.weights,
            "weights_sha256": ident.weights_sha256,
            "preprocessing": json.dumps(ident.preprocessing.to_dict(), sort_keys=True),
            "pool": ident.pool,
            "precision": ident.precision,
            "dtype": cache.dtype,
            "engine": cache.engine,
            "shards": cache.shards,
            "label_map": json.dumps(cache.label_map.to_dict(), sort_keys=True),
            "data_root": cache.data_root,
            "created": cache.created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "featcache_version": __version__,
        }
    )


def _check_segments(path: Path) -> None:
    """A clear error when a segment behind the cache at ``path`` is missing or unreadable (HDF5 would
    silently fill its rows with NaN)."""
    with h5py.File(path, "r") as f:
        sources = set()
        for name in ("features", "maps"):
            if name in f and f[name].is_virtual:
                sources |= {s.file_name for s in f[name].virtual_sources()}
    for name in sorted(sources):
        segment = path.parent / name
        try:
            with h5py.File(segment, "r") as f:
                f["features"].shape  # noqa: B018 - opening it is the check
        except (OSError, KeyError) as e:
            reason = "missing" if not segment.exists() else f"unreadable ({e})"
            raise FeatcacheError(
                f"{path}: its shard {name} is {reason}; rerun the extract that made it"
            ) from None


def stored_bytes(path: Path) -> int:
    """The bytes the cache at ``path`` takes: the file, and the segments it indexes."""
    total = path.stat().st_size
    with h5py.File(path, "r") as f:
        if f["features"].is_virtual:
            names = {s.file_name for s in f["features"].virtual_sources()}
            total += sum((path.parent / n).stat().st_size for n in names if (path.parent / n).is_file())
    return total


def read_cache(path: str | os.PathLike, maps: bool = False) -> FeatureCache:
    """Open the feature cache at ``path``; a clear error for anything else. Its listing (paths,
    labels, classes, identity) is read now; its features and maps are :class:`Rows`, read when
    asked. (``maps`` is accepted for older callers: the maps are always there to read.)"""
    path = Path(path)
    if path.is_dir():
        raise FeatcacheError(f"{path}: a folder, not a featcache feature cache")
    if not path.is_file():
        raise FeatcacheError(f"{path}: no such feature cache (extract one from an image folder first)")
    try:
        f = h5py.File(path, "r")  # kept open: the cache's rows are read through it
    except OSError as e:
        raise FeatcacheError(f"{path}: not a readable featcache feature cache ({e})") from None
    try:
        if f.attrs.get("format") != FORMAT:
            raise FeatcacheError(f"{path}: not a featcache feature cache")
        version = int(f.attrs["format_version"])
        if version > FORMAT_VERSION:
            raise FeatcacheError(
                f"{path}: cache format {version} is newer than this featcache understands "
                f"({FORMAT_VERSION}); upgrade featcache"
            )
        skipped = list(
            zip(
                _decode(f["skipped/paths"][()]),
                [r.decode() if isinstance(r, bytes) else r for r in f["skipped/reasons"][()]],
                strict=True,
            )
        )
        identity = BackboneIdentity.from_dict(json.loads(f.attrs["identity"]))
        generation = str(f.attrs.get("generation", ""))
        virtual = f["features"].is_virtual
        features = Rows(path, "features", f["features"].shape, f["features"].dtype, generation, f)
        kept = None
        if identity.maps is not None:
            kept = Rows(path, "maps", f["maps"].shape, np.float16, generation, f)
        cache = FeatureCache(
            features=features,
            labels=f["labels"][()],
            paths=_decode(f["paths"][()]),
            sizes=f["file_size"][()],
            mtimes_ns=f["file_mtime_ns"][()],
            folders=[c.decode() if isinstance(c, bytes) else c for c in f["classes"][()]],
            identity=identity,
            label_map=LabelMap.from_dict(json.loads(f.attrs["label_map"])),
            skipped=skipped,
            data_root=str(f.attrs["data_root"]),
            dtype=str(f.attrs["dtype"]),
            engine=str(f.attrs.get("engine", "torch")),  # before engines, all were torch
            shards=int(f.attrs.get("shards", 0)),
            created=str(f.attrs["created"]),
            featcache_version=str(f.attrs["featcache_version"]),
            maps=kept,
            path=path,
        )
        if virtual:
            _check_segments(path)
    except (FeatcacheError, OSError, KeyError, ValueError, TypeError) as e:
        f.close()
        if isinstance(e, FeatcacheError):
            raise
        raise FeatcacheError(f"{path}: not a readable featcache feature cache ({e})") from None
    return cache


@dataclass(frozen=True)
class CompactResult:
    """What :func:`compact` did: the rows kept, and the segment files and bytes it freed."""

    n_images: int
    segments: int
    bytes_before: int
    bytes_after: int


def compact(path: str | os.PathLike) -> CompactResult:
    """Copy the rows of the cache at ``path`` into the file itself (a block at a time) and delete the
    segments it indexed. A cache already in one file is left as it is."""
    path = Path(path)
    cache = read_cache(path)
    before = stored_bytes(path)
    segments = len(locations(path).files) if cache.features_virtual() else 0
    if segments:
        write_cache(cache, path)
    remove_unindexed(path)
    return CompactResult(len(cache), segments, before, stored_bytes(path))


def needs_compacting(rows: Locations, counts: list[int]) -> bool:
    """Whether an index of ``rows`` over segments of ``counts`` rows is worth copying into one file."""
    stored = sum(counts)
    dead = 1 - len(rows) / stored if stored else 0.0
    return dead > COMPACT_DEAD_SHARE or len(rows.files) > COMPACT_SEGMENTS or len(rows.runs()) > COMPACT_RUNS


def remove_unindexed(path: Path) -> int:
    """Delete the files of ``path``'s segment folder that its index does not map (left by updates
    and killed runs), and the folder when it is left empty. Returns how many were deleted."""
    folder = segment_folder(path)
    if not folder.is_dir():
        return 0
    indexed = set(locations(path).files) if path.is_file() else set()
    removed = 0
    for file in folder.iterdir():
        if file.resolve() not in indexed:
            file.unlink(missing_ok=True)
            removed += 1
    with contextlib.suppress(OSError):
        folder.rmdir()
    return removed
