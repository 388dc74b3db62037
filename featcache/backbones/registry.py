"""The registry: backbone names to their entries. Adding a backbone is one :func:`register` call."""

from __future__ import annotations

from collections.abc import Callable

from featcache.backbones.entry import BackboneEntry
from featcache.choices import DEFAULT_BACKBONE
from featcache.errors import FeatcacheError, UsageError

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
    """The registry entry for ``name``; raises :class:`UsageError` for an unknown name (at once,
    without asking the fallbacks, when it is a near-miss of a registered one)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    import difflib

    # 0.9: no torchvision model name is that close to a registered one (the nearest, efficientnet_b0
    # to efficientnet_lite0, is 0.85), so a near-miss is a typo
    close = difflib.get_close_matches(name, list_backbones(), n=1, cutoff=0.9)
    if close:
        raise UsageError(
            f"unknown backbone {name!r}; did you mean {close[0]!r}? (featcache backbones lists them)"
        )
    for factory in _FALLBACKS:
        try:
            entry = factory(name)
        except ValueError as e:
            raise FeatcacheError(f"backbone {name!r}: {e}") from None
        if entry is not None:
            return entry
    raise UsageError(
        f"unknown backbone {name!r}: choose one of {', '.join(list_backbones())}, any torchvision "
        "classification model name (e.g. resnet50), or timm:NAME for any timm model (e.g. timm:convnext_tiny)"
    )
