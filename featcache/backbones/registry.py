"""The registry: backbone names to their entries. Adding a backbone is one :func:`register` call."""

from __future__ import annotations

from collections.abc import Callable

from featcache.backbones.identity import BackboneEntry
from featcache.choices import DEFAULT_BACKBONE
from featcache.errors import FeatcacheError

_REGISTRY: dict[str, BackboneEntry] = {}
_FALLBACKS: list[Callable[[str], BackboneEntry | None]] = []


def register(entry: BackboneEntry) -> BackboneEntry:
    """Add ``entry`` to the registry under ``entry.name``."""
    if entry.name in _REGISTRY:
        raise ValueError(f"backbone {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def register_fallback(factory: Callable[[str], BackboneEntry | None]) -> None:
    """Add a factory asked for names that are not registered (e.g. any torchvision model)."""
    _FALLBACKS.append(factory)


def list_backbones() -> list[str]:
    """Names of the registered backbones, the default first."""
    return sorted(_REGISTRY, key=lambda name: (name != DEFAULT_BACKBONE, name))


def get_entry(name: str) -> BackboneEntry:
    """The registry entry for ``name``; raises :class:`FeatcacheError` for an unknown name."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    for factory in _FALLBACKS:
        try:
            entry = factory(name)
        except ValueError as e:
            raise FeatcacheError(f"backbone {name!r}: {e}") from None
        if entry is not None:
            return entry
    raise FeatcacheError(
        f"unknown backbone {name!r}: choose one of {', '.join(list_backbones())}, any torchvision "
        "classification model name (e.g. resnet50), or timm:NAME for any timm model (e.g. timm:convnext_tiny)"
    )
