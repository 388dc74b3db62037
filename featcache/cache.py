"""The HDF5 feature cache: one file with the embeddings and everything that identifies them.

Files are always written whole to a temporary name and renamed into place, so a reader (or a
killed writer) only ever sees the previous complete cache or the new complete one.
"""

from __future__ import annotations

import json
import math
import os
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
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CacheSummary:
    """How many images a cache holds (labelled or not), of how many classes, its file's size, and
    for a cache with maps their stage, shape (C, h, w) and KiB per image (float16)."""

    n_images: int
    n_labelled: int
    n_classes: int
    size_bytes: int
    kib_per_image: float
    maps: tuple[int, tuple[int, int, int], float] | None = None


@dataclass
class FeatureCache:
    """The contents of a feature cache, in memory.

    Row ``i`` is the image ``paths[i]`` (relative to ``data_root``, ``/``-separated), with class
    index ``labels[i]`` into the class folder names ``folders`` (-1 when unlabelled), embedding
    ``features[i]``, and the file's ``sizes[i]``/``mtimes_ns[i]`` when it was read. ``skipped``
    lists ``(path, reason)``. ``engine`` names what computed the features (``openvino``,
    ``torch``, or both, comma-separated); it is recorded, not compared, as the engines' fp32
    features are interchangeable. ``shards`` is how many shards a Dask cluster computed (0: one
    process). ``maps`` (float16, N×C×h×w) holds the unpooled maps of stage ``identity.maps`` when
    the cache keeps them and they were read (``read_cache(..., maps=True)``, or :meth:`labelled`
    with ``maps`` from the file at ``path``, the file the cache was read from). ``changes`` says
    what was changed in memory since it was read (e.g. labels corrected), and is not written.
    """

    features: np.ndarray
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
    maps: np.ndarray | None = field(default=None, repr=False)
    path: Path | None = None
    changes: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def names(self) -> list[str]:
        """Display names of the classes (from the label map when there is one)."""
        return [self.label_map.display(c) for c in self.folders]

    def labelled(
        self, paths: Collection[str] | None = None, maps: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """The float32 features (with ``maps``: the float16 maps) of the labelled rows (of ``paths``
        only, when given) and their class folder names."""
        mask = self.labels >= 0
        if paths is not None:
            wanted = set(paths)
            mask &= np.array([p in wanted for p in self.paths], dtype=bool)
        folders = np.array(self.folders, dtype=object)
        if maps and self.maps is None:
            if self.identity.maps is None or self.path is None:
                raise FeatcacheError(
                    "this cache keeps no feature maps: extract with --maps STAGE"
                    if self.identity.maps is None
                    else "the cache's maps were not read (read_cache(path, maps=True))"
                )
            with h5py.File(self.path, "r") as f:
                self.maps = f["maps"][()]
        X = self.maps[mask] if maps else self.features[mask].astype(np.float32)
        return X, folders[self.labels[mask]].astype(str)

    def same_content(self, other: FeatureCache) -> bool:
        """Whether ``other`` holds the same rows, files, class folders, skip records and labels (the
        creation time and featcache version aside)."""
        return (
            self.paths == other.paths
            and self.folders == other.folders
            and self.skipped == other.skipped
            and self.label_map == other.label_map
            and self.data_root == other.data_root
            and np.array_equal(self.labels, other.labels)
            and np.array_equal(self.sizes, other.sizes)
            and np.array_equal(self.mtimes_ns, other.mtimes_ns)
            and np.array_equal(self.features, other.features)
            and (self.maps is None) == (other.maps is None)
            and (self.maps is None or np.array_equal(self.maps, other.maps))
        )

    def summary(self) -> CacheSummary:
        """Counts and sizes, as ``featcache info`` shows them."""
        from featcache.backbones.registry import get_entry

        n = len(self)
        size = self.path.stat().st_size if self.path is not None and self.path.is_file() else 0
        maps = None
        if self.identity.maps is not None:
            shape = get_entry(self.identity.backbone).maps_shape(self.identity.maps)
            maps = (self.identity.maps, shape, math.prod(shape) * 2 / 1024)
        return CacheSummary(
            n_images=n,
            n_labelled=int((self.labels >= 0).sum()),
            n_classes=len(self.folders),
            size_bytes=size,
            kib_per_image=size / n / 1024 if n else 0.0,
            maps=maps,
        )

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


def write_cache(
    cache: FeatureCache, path: str | os.PathLike, features_from: list[tuple[Path, int]] | None = None
) -> None:
    """Write ``cache`` to ``path`` atomically (temporary file, fsync, rename).

    With ``features_from`` (shard caches and their row counts, in row order), the features are
    not copied: they are an HDF5 virtual dataset over the shards' features, which must stay
    where they are (their paths are stored relative to ``path``).
    """
    path = Path(path)
    if cache.identity.maps is not None and (cache.maps is None or len(cache.maps) != len(cache)):
        raise FeatcacheError("a cache whose identity keeps maps needs one row of maps per image")
    if features_from is not None and cache.maps is not None:
        raise FeatcacheError("a virtual cache indexes features only, not maps")
    if cache.dtype not in DTYPES:
        raise FeatcacheError(f"dtype must be one of {DTYPES}, got {cache.dtype!r}")
    str_dt = h5py.string_dtype()
    with replaced_atomically(path) as tmp:
        with h5py.File(tmp, "w") as f:
            if features_from is None:
                f.create_dataset("features", data=cache.features.astype(cache.dtype, copy=False))
                if cache.maps is not None:
                    chunks = (1, *cache.maps.shape[1:]) if len(cache.maps) else None
                    f.create_dataset("maps", data=cache.maps.astype(np.float16, copy=False), chunks=chunks)
            else:
                f.create_virtual_dataset(
                    "features", _layout(features_from, path.parent, cache), fillvalue=np.nan
                )
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


def _layout(sources: list[tuple[Path, int]], folder: Path, cache: FeatureCache) -> h5py.VirtualLayout:
    dim = cache.identity.feature_dim
    layout = h5py.VirtualLayout(shape=(sum(n for _, n in sources), dim), dtype=cache.dtype)
    start = 0
    for source, n in sources:
        relative = os.path.relpath(source, folder)
        layout[start : start + n] = h5py.VirtualSource(relative, "features", shape=(n, dim))
        start += n
    return layout


def _virtual_features(path: Path, dataset: h5py.Dataset) -> np.ndarray:
    """The features of a virtual cache, after checking that every shard behind them is there whole
    (HDF5 would silently fill a missing one with NaN)."""
    for source in dataset.virtual_sources():
        shard = path.parent / source.file_name
        try:
            with h5py.File(shard, "r") as f:
                f[source.dset_name].shape  # noqa: B018 - opening it is the check
        except (OSError, KeyError) as e:
            reason = "missing" if not shard.exists() else f"unreadable ({e})"
            raise FeatcacheError(
                f"{path}: its shard {source.file_name} is {reason}; rerun the extract that made it"
            ) from None
    features = dataset[()]
    if np.isnan(features).any():
        raise FeatcacheError(f"{path}: a shard behind it is damaged (NaN features); rerun the extract")
    return features


def read_cache(path: str | os.PathLike, maps: bool = False) -> FeatureCache:
    """Load a feature cache written by :func:`write_cache`; a clear error for anything else. The
    maps of a cache that keeps them are read only with ``maps``."""
    path = Path(path)
    if path.is_dir():
        raise FeatcacheError(f"{path}: a folder, not a featcache feature cache")
    if not path.is_file():
        raise FeatcacheError(f"{path}: no such feature cache (extract one from an image folder first)")
    try:
        with h5py.File(path, "r") as f:
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
            features = f["features"]
            identity = BackboneIdentity.from_dict(json.loads(f.attrs["identity"]))
            kept = f["maps"][()] if maps and identity.maps is not None else None
            return FeatureCache(
                features=_virtual_features(path, features) if features.is_virtual else features[()],
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
    except FeatcacheError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise FeatcacheError(f"{path}: not a readable featcache feature cache ({e})") from None
