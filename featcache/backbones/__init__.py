"""Backbones: what they are (:mod:`.identity`, plain data), which exist (:mod:`.registry`), and
the one factory that builds them (:func:`featcache.backbones.build.build_backbone`).

Importing this package registers the backbone families and imports no torch; building one does.
"""

from featcache.backbones import efficientnet_lite, mobilenet, torchvision_any  # noqa: F401  (registers)
from featcache.backbones.identity import (
    RANDOM,
    BackboneEntry,
    BackboneIdentity,
    Embedder,
    Preprocessing,
    WeightsSource,
)
from featcache.backbones.registry import get_entry, list_backbones, register, register_fallback

__all__ = [
    "RANDOM",
    "BackboneEntry",
    "BackboneIdentity",
    "Embedder",
    "Preprocessing",
    "WeightsSource",
    "get_entry",
    "list_backbones",
    "register",
    "register_fallback",
]
