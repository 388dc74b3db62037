"""Backbone entries, their identity, and the registry that maps names to entries."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featcache.errors import FeatcacheError, FeatcacheWarning
from featcache.images import Preprocessing, normalize

POOLS = ("avg", "max", "avgmax")
DEFAULT_BACKBONE = "mobilenet_v2"
RANDOM = "random"


@dataclass(frozen=True)
class WeightsSource:
    """Where one named set of weights comes from.

    ``filename`` is the file's name in the torch hub cache (``<hub>/checkpoints/``); when it
    carries a hash prefix (``name-<hex>.pth``) the file is checked against it. ``bundled`` finds a
    copy shipped inside an installed package, ``url`` is the download address.
    """

    name: str
    filename: str
    url: str | None = None
    bundled: Callable[[], Path | None] | None = None
    description: str = ""


@dataclass(frozen=True)
class BackboneEntry:
    """Everything featcache needs to know about one backbone family.

    ``build()`` returns the architecture (with its ImageNet classifier) and no trained weights;
    ``load(model, state_dict)`` puts a weights file into it; ``features(model, x)`` maps a
    normalised N×3×H×W batch to N×C×h×w feature maps (or to N×C embeddings already pooled, in
    which case ``pools`` is ``("avg",)``); ``head(model)`` is the ImageNet classifier that takes
    the average-pooled embedding (used to check that weights and preprocessing are right).
    """

    name: str
    description: str
    feature_dim: int
    preprocessing: Preprocessing
    weights: tuple[WeightsSource, ...]
    build: Callable[[], nn.Module]
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    head: Callable[[nn.Module], nn.Module]
    load: Callable[[nn.Module, dict], None] = lambda model, sd: model.load_state_dict(sd)
    pools: tuple[str, ...] = POOLS

    @property
    def default_weights(self) -> str:
        return self.weights[0].name

    def weights_source(self, name: str) -> WeightsSource | None:
        return next((w for w in self.weights if w.name == name), None)


@dataclass(frozen=True)
class BackboneIdentity:
    """What produced a set of features: compared, never rebuilt by hand.

    ``weights`` is a weights name (``IMAGENET1K_V1``), ``random``, or the absolute path of an
    explicit weights file; ``weights_sha256`` identifies the tensors themselves.
    """

    backbone: str
    weights: str
    weights_sha256: str
    preprocessing: Preprocessing
    pool: str
    feature_dim: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing.to_dict(),
            "pool": self.pool,
            "feature_dim": self.feature_dim,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneIdentity:
        return cls(
            backbone=d["backbone"],
            weights=d["weights"],
            weights_sha256=d["weights_sha256"],
            preprocessing=Preprocessing.from_dict(d["preprocessing"]),
            pool=d["pool"],
            feature_dim=int(d["feature_dim"]),
        )

    def differences(self, other: BackboneIdentity) -> list[str]:
        """What differs from ``other``, in words (empty when the features are interchangeable)."""
        out = []
        for key in ("backbone", "weights_sha256", "preprocessing", "pool", "feature_dim"):
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine != theirs:
                if key == "weights_sha256":
                    mine, theirs = f"{self.weights} ({mine[:12]})", f"{other.weights} ({theirs[:12]})"
                out.append(f"{key}: {mine} vs {theirs}")
        return out


class Backbone(nn.Module):
    """A frozen network that maps images to pooled embeddings, with the identity that describes it."""

    def __init__(self, entry: BackboneEntry, model: nn.Module, identity: BackboneIdentity):
        super().__init__()
        self.entry = entry
        self.model = model.eval().requires_grad_(False)
        self.identity = identity

    @property
    def preprocessing(self) -> Preprocessing:
        return self.identity.preprocessing

    @property
    def feature_dim(self) -> int:
        return self.identity.feature_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised N×3×H×W batch → N×D pooled embeddings."""
        maps = self.entry.features(self.model, x)
        if maps.ndim == 2:
            return maps
        if self.identity.pool == "avg":
            return maps.mean(dim=(2, 3))
        if self.identity.pool == "max":
            return maps.amax(dim=(2, 3))
        return torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """N×H×W×3 uint8 pixels (from :func:`featcache.images.load_pixels`) → N×D float32 embeddings."""
        x = normalize(pixels, self.preprocessing).to(self.device)
        return self(x).float().cpu().numpy()

    @torch.inference_mode()
    def imagenet_logits(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """ImageNet class logits for N×H×W×3 uint8 pixels (a check that weights and preprocessing fit)."""
        x = normalize(pixels, self.preprocessing).to(self.device)
        maps = self.entry.features(self.model, x)
        pooled = maps if maps.ndim == 2 else maps.mean(dim=(2, 3))
        return self.entry.head(self.model)(pooled)


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
        entry = factory(name)
        if entry is not None:
            return entry
    raise FeatcacheError(
        f"unknown backbone {name!r}: choose one of {', '.join(list_backbones())}, "
        "or any torchvision classification model name (e.g. resnet50)"
    )


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | None = None,
    pool: str = "avg",
    device: str | torch.device = "cpu",
    download: bool = True,
    progress: bool = False,
) -> Backbone:
    """Build backbone ``name`` with ``weights`` (a weights name, a file path or ``"random"``).

    Weights are found as an explicit path, then in the torch hub cache, then downloaded with
    their hash checked (unless ``download`` is false or ``FEATCACHE_OFFLINE=1``).
    ``"random"`` gives untrained weights (for plumbing tests) and warns.
    """
    from featcache.backbones.weights import file_sha256, resolve_weights

    entry = get_entry(name)
    if pool not in entry.pools:
        raise FeatcacheError(f"pool {pool!r} is not available for {name}: choose one of {entry.pools}")
    weights = weights or entry.default_weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = entry.build()
    if weights == RANDOM:
        warnings.warn(
            f"{name} uses random weights: its features are meaningless for classification",
            FeatcacheWarning,
            stacklevel=2,
        )
        label, sha = RANDOM, _state_sha256(model)
    else:
        label, path = resolve_weights(entry, weights, download=download, progress=progress)
        sha = file_sha256(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any unreadable file: say which one
            raise FeatcacheError(f"cannot load weights file {path}: {e}") from None
        try:
            entry.load(model, state)
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0]
            raise FeatcacheError(f"weights file {path} does not fit backbone {name}: {first}") from None
    dim = entry.feature_dim * (2 if pool == "avgmax" else 1)
    identity = BackboneIdentity(name, label, sha, entry.preprocessing, pool, dim)
    return Backbone(entry, model, identity).to(device)


def _state_sha256(model: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is usable, else ``cpu``; errors for an unusable choice."""
    if device not in DEVICES:
        raise FeatcacheError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise FeatcacheError("--device cuda: no CUDA GPU is available here (use --device cpu or auto)")
    return device


def backbone_for(identity: BackboneIdentity, device: str = "cpu") -> Backbone:
    """Build the backbone an identity describes; refuse when the weights at hand are not the same."""
    net = create_backbone(identity.backbone, identity.weights, pool=identity.pool, device=device)
    differences = net.identity.differences(identity)
    if differences:
        raise FeatcacheError(
            f"the {identity.backbone} backbone available here differs from the one recorded "
            f"({'; '.join(differences)})"
        )
    return net


__all__ = [
    "POOLS",
    "RANDOM",
    "Backbone",
    "BackboneEntry",
    "BackboneIdentity",
    "WeightsSource",
    "create_backbone",
    "get_entry",
    "list_backbones",
    "register",
    "register_fallback",
    "backbone_for",
    "resolve_device",
]
