"""Settings that travel together, as small frozen values: what network makes the features
(:class:`BackboneSpec`), where and how it runs (:class:`RunOptions`) and how a cache is written
(:class:`CacheOptions`). Plain data, no heavy imports.

The library's entry points take these values, or their fields by name (``extract(data,
backbone="efficientnet_lite0", engine="torch")``): :func:`gather` sorts such keywords into them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from featcache.choices import DEFAULT_BACKBONE


@dataclass(frozen=True)
class BackboneSpec:
    """What network makes the features: a registered backbone, its weights (a name, a file or
    ``random``), the pooling, the pooled layers, the stage whose maps are kept, and the arithmetic.
    ``None`` means "not said": :meth:`resolved` fills it in."""

    backbone: str | None = None
    weights: str | None = None
    pool: str | None = None
    layers: str | None = None
    maps: int | None = None
    precision: str | None = None

    def resolved(self, recorded: Any = None) -> BackboneSpec:
        """Every setting said: the ones not given are those ``recorded`` (a cache's
        :class:`~featcache.backbones.identity.BackboneIdentity`) holds when it is of the same
        backbone, else the defaults (``mobilenet_v2``, its first weights, ``avg``, ``last``,
        no maps, ``fp32``; ``weights`` stays None for the entry's default)."""
        backbone = self.backbone or (recorded.backbone if recorded is not None else DEFAULT_BACKBONE)
        same = recorded is not None and recorded.backbone == backbone
        return BackboneSpec(
            backbone=backbone,
            weights=self.weights or (recorded.weights if same else None),
            pool=self.pool or (recorded.pool if same else "avg"),
            layers=self.layers or (recorded.layers if same else "last"),
            maps=self.maps if self.maps is not None or not same else recorded.maps,
            precision=self.precision or (recorded.precision if same else "fp32"),
        )


@dataclass(frozen=True)
class RunOptions:
    """Where and how a backbone runs: ``device`` (``auto``, ``cpu``, ``cuda``), ``engine`` (``auto``,
    ``openvino``, ``torch``), images per forward pass, decoding threads, and for a Dask cluster the
    ``scheduler`` (``local``, ``local:N`` or ``tcp://HOST:PORT``) and the files per shard."""

    device: str = "auto"
    engine: str = "auto"
    batch_size: int = 32
    workers: int = 2
    scheduler: str | None = None
    shard_size: int = 10000


@dataclass(frozen=True)
class CacheOptions:
    """How ``extract`` writes its cache: the features' ``dtype`` (None: the cache's, else float32),
    a label map file or preset, whether a cache of other settings is replaced, and whether a
    cluster's shards are indexed (``virtual``) instead of copied."""

    dtype: str | None = None
    labels: str | Any | None = None
    overwrite: bool = False
    virtual: bool = False


def gather(function: str, settings: dict[str, Any], *given: Any) -> tuple[Any, ...]:
    """``given`` (instances of the settings classes, or None for their defaults) with the fields
    named in ``settings`` replaced; a ``TypeError`` naming ``function`` for a keyword that is no
    field of any of them."""
    values = []
    left = dict(settings)
    for value in given:
        names = {f.name for f in dataclasses.fields(value)}
        mine = {k: left.pop(k) for k in list(left) if k in names}
        values.append(dataclasses.replace(value, **mine) if mine else value)
    if left:
        raise TypeError(f"{function}() got an unexpected keyword argument {next(iter(left))!r}")
    return tuple(values)
