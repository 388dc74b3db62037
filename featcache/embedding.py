"""From image files to cache rows: embedding them in batches, and assembling rows into a cache.

Shared by one-process extraction and the tasks of a Dask cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from featcache.backbones.embedder import Embedder
from featcache.backbones.identity import BackboneIdentity
from featcache.cache import FeatureCache
from featcache.dataset import Dataset, ImageFile, LabelMap
from featcache.images import load_batches


class Row(NamedTuple):
    """One image's row: the file's size and modification time (ns) when it was read, its
    embedding, and its float16 maps (None: not kept)."""

    size: int
    mtime_ns: int
    features: np.ndarray
    maps: np.ndarray | None


def embed_files(
    net: Embedder, dataset: Dataset, todo: list[ImageFile], batch_size: int, workers: int
) -> Iterator[tuple[dict[str, Row], dict[str, str]]]:
    """Embed the images ``todo`` of ``dataset``; yield ``(rows, skipped)`` per batch (rows by
    relative path, skipped files with their reasons). Decoding of the next batches overlaps with
    the network."""
    sources = [dataset.path(f.relpath) for f in todo]
    loaded = load_batches(sources, net.preprocessing, batch_size, workers)
    for start, pixels in zip(range(0, len(todo), batch_size), loaded, strict=True):
        yield _run_batch(net, todo[start : start + batch_size], pixels)


def _run_batch(
    net: Embedder, batch: list[ImageFile], loaded: list[np.ndarray | str]
) -> tuple[dict[str, Row], dict[str, str]]:
    good = [(f, px) for f, px in zip(batch, loaded, strict=True) if not isinstance(px, str)]
    skipped = {f.relpath: px for f, px in zip(batch, loaded, strict=True) if isinstance(px, str)}
    rows: dict[str, Row] = {}
    if good:
        pixels = np.stack([px for _, px in good])
        if net.identity.maps is None:
            feats, maps = net.embed(pixels), None
        else:
            feats, maps = net.embed_maps(pixels)
            maps = maps.astype(np.float16)
        rows = {
            f.relpath: Row(f.size, f.mtime_ns, feats[i], None if maps is None else maps[i])
            for i, (f, _) in enumerate(good)
        }
    return rows, skipped


def assemble(
    dataset: Dataset,
    identity: BackboneIdentity,
    dtype: str,
    label_map: LabelMap,
    reusable: dict[str, Row],
    computed: dict[str, Row],
    skipped: list[tuple[str, str]],
) -> FeatureCache:
    """The cache of ``dataset``'s files that have a row (``computed`` first, else ``reusable``), in
    the dataset's order, with ``skipped`` listed."""
    files = [f for f in dataset.files if f.relpath in reusable or f.relpath in computed]
    rows = [computed.get(f.relpath) or reusable[f.relpath] for f in files]
    empty = np.zeros((0, identity.feature_dim), np.float32)
    features = np.stack([r.features for r in rows]) if rows else empty
    maps = None
    if identity.maps is not None:
        from featcache.backbones.registry import get_entry

        shape = get_entry(identity.backbone).maps_shape(identity.maps)
        maps = np.stack([r.maps for r in rows]) if rows else np.zeros((0, *shape), np.float16)
    return FeatureCache(
        features=features.astype(dtype),
        labels=np.array([f.label for f in files], dtype=np.int32),
        paths=[f.relpath for f in files],
        sizes=np.array([r[0] for r in rows], dtype=np.int64),
        mtimes_ns=np.array([r[1] for r in rows], dtype=np.int64),
        folders=dataset.folders,
        identity=identity,
        label_map=label_map,
        skipped=skipped,
        data_root=str(dataset.root.resolve()),
        dtype=dtype,
        maps=maps,
    )
