"""The backbone registry: ``create_backbone(name, weights, pool)`` is the only way in.

Adding a backbone is one :class:`BackboneEntry` registered in a module of this package.
"""

from featcache.backbones import efficientnet_lite, mobilenet, torchvision_any  # noqa: F401,E402  (registers)
from featcache.backbones.registry import (
    DEFAULT_BACKBONE,
    POOLS,
    PRECISIONS,
    RANDOM,
    Backbone,
    BackboneEntry,
    BackboneIdentity,
    WeightsSource,
    backbone_for,
    create_backbone,
    get_entry,
    list_backbones,
    load_backbone,
    register,
    resolve_device,
)

__all__ = [
    "DEFAULT_BACKBONE",
    "POOLS",
    "PRECISIONS",
    "RANDOM",
    "Backbone",
    "BackboneEntry",
    "BackboneIdentity",
    "WeightsSource",
    "backbone_for",
    "create_backbone",
    "get_entry",
    "list_backbones",
    "load_backbone",
    "register",
    "resolve_device",
]
