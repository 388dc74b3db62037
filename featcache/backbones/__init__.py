"""Backbones: what they are (:mod:`.identity`, plain data), which exist (:mod:`.registry`), and
the one factory that builds them (:func:`featcache.backbones.build.build_backbone`).

Importing this package registers the backbone families and imports no torch; building one does.
"""

# registration order is lookup order: timm's names are recognised by their prefix, before torchvision's
from featcache.backbones import efficientnet_lite, mobilenet, timm_any, torchvision_any  # noqa: F401, I001
from featcache.backbones.embedder import Embedder
from featcache.backbones.entry import BackboneEntry, WeightsSource
from featcache.backbones.identity import RANDOM, BackboneIdentity
from featcache.preprocessing import Preprocessing
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
