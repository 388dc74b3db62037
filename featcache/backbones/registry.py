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
PRECISIONS = ("fp32", "bf16")
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
    explicit weights file; ``weights_sha256`` identifies the tensors themselves. ``precision`` is
    the arithmetic of the forward pass (``fp32``, or ``bf16`` autocast).
    """

    backbone: str
    weights: str
    weights_sha256: str
    preprocessing: Preprocessing
    pool: str
    feature_dim: int
    precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing.to_dict(),
            "pool": self.pool,
            "feature_dim": self.feature_dim,
            "precision": self.precision,
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
            precision=d.get("precision", "fp32"),
        )

    def differences(self, other: BackboneIdentity) -> list[str]:
        """What differs from ``other``, in words (empty when the features are interchangeable)."""
        out = []
        for key in ("backbone", "weights_sha256", "preprocessing", "pool", "feature_dim", "precision"):
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine != theirs:
                if key == "weights_sha256":
                    mine, theirs = f"{self.weights} ({mine[:12]})", f"{other.weights} ({theirs[:12]})"
                out.append(f"{key}: {mine} vs {theirs}")
        return out


class Described:
    """The parts of a backbone that its identity alone determines."""

    identity: BackboneIdentity

    @property
    def preprocessing(self) -> Preprocessing:
        return self.identity.preprocessing

    @property
    def feature_dim(self) -> int:
        return self.identity.feature_dim


class Backbone(Described, nn.Module):
    """A frozen network that maps images to pooled embeddings, with the identity that describes it.

    With ``optimize`` (the default) BatchNorms are folded into their convolutions and the model
    runs in ``channels_last`` layout: the same function, faster, equal up to float rounding.
    """

    def __init__(
        self, entry: BackboneEntry, model: nn.Module, identity: BackboneIdentity, optimize: bool = True
    ):
        super().__init__()
        if identity.precision not in PRECISIONS:
            raise FeatcacheError(f"precision must be one of {PRECISIONS}, got {identity.precision!r}")
        self.entry = entry
        self.model = model.eval().requires_grad_(False)
        self.identity = identity
        self.optimized = optimize
        self.folded = 0
        if optimize:
            from featcache.backbones.fold import fold_batchnorm

            self.folded = fold_batchnorm(self.model, entry.features)
            self.model.to(memory_format=torch.channels_last)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised N×3×H×W batch → the backbone's float32 output, in the identity's precision."""
        if self.optimized:
            x = x.contiguous(memory_format=torch.channels_last)
        bf16 = self.identity.precision == "bf16"
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            maps = self.entry.features(self.model, x)
        return maps.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised N×3×H×W batch → N×D pooled embeddings."""
        maps = self.feature_maps(x)
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
        maps = self.feature_maps(x)
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
    precision: str = "fp32",
    optimize: bool = True,
) -> Backbone:
    """Build backbone ``name`` with ``weights`` (a weights name, a file path or ``"random"``).

    Weights are found as an explicit path, then in the torch hub cache, then downloaded with
    their hash checked (unless ``download`` is false or ``FEATCACHE_OFFLINE=1``).
    ``"random"`` gives untrained weights (for plumbing tests) and warns. ``precision`` is
    ``fp32`` or ``bf16`` (autocast); ``optimize=False`` keeps the model exactly as built.
    """
    from featcache.backbones.weights import file_sha256, resolve_weights

    entry = _checked_entry(name, pool, precision)
    weights = weights or entry.default_weights
    if weights == RANDOM:
        return _build(entry, RANDOM, None, None, pool, precision, device, optimize)
    label, path = resolve_weights(entry, weights, download=download, progress=progress)
    return _build(entry, label, path, file_sha256(path), pool, precision, device, optimize)


def _build(
    entry: BackboneEntry,
    label: str,
    path: Path | None,
    sha: str | None,
    pool: str,
    precision: str,
    device: str | torch.device,
    optimize: bool = True,
) -> Backbone:
    """The network of ``entry`` with the weights file ``path`` (whose SHA-256 is ``sha``), or random."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = entry.build()
    if path is None:
        warnings.warn(
            f"{entry.name} uses random weights: its features are meaningless for classification",
            FeatcacheWarning,
            stacklevel=3,
        )
        sha = _state_sha256(model)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any unreadable file: say which one
            raise FeatcacheError(f"cannot load weights file {path}: {e}") from None
        try:
            entry.load(model, state)
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0]
            raise FeatcacheError(f"weights file {path} does not fit backbone {entry.name}: {first}") from None
    dim = _dim(entry, pool)
    identity = BackboneIdentity(entry.name, label, sha, entry.preprocessing, pool, dim, precision)
    return Backbone(entry, model, identity, optimize=optimize).to(device)


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | None = None,
    pool: str = "avg",
    device: str = "cpu",
    download: bool = True,
    progress: bool = False,
    precision: str = "fp32",
) -> Backbone:
    """:func:`create_backbone`, but a trace saved by an earlier run with the same weights file is
    loaded instead of building the network (and one is saved after building it).

    Random weights are always built.
    """
    from featcache.backbones import traced as tr
    from featcache.backbones.weights import file_sha256, resolve_weights

    entry = _checked_entry(name, pool, precision)
    weights = weights or entry.default_weights
    if weights == RANDOM:
        return _build(entry, RANDOM, None, None, pool, precision, device)
    label, path = resolve_weights(entry, weights, download=download, progress=progress)
    sha = file_sha256(path)
    identity = BackboneIdentity(name, label, sha, entry.preprocessing, pool, _dim(entry, pool), precision)
    if (ready := tr.load_traced(identity, device)) is not None:
        return ready  # type: ignore[return-value]  # the same embed() and identity
    net = _build(entry, label, path, sha, pool, precision, device)
    tr.save_traced(net)
    return net


def _checked_entry(name: str, pool: str, precision: str) -> BackboneEntry:
    entry = get_entry(name)
    if pool not in entry.pools:
        raise FeatcacheError(f"pool {pool!r} is not available for {name}: choose one of {entry.pools}")
    if precision not in PRECISIONS:
        raise FeatcacheError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return entry


def _dim(entry: BackboneEntry, pool: str) -> int:
    return entry.feature_dim * (2 if pool == "avgmax" else 1)


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


def backbone_for(identity: BackboneIdentity, device: str = "cpu", traced: bool = True) -> Backbone:
    """Build the backbone an identity describes; refuse when the weights at hand are not the same.

    With ``traced``, a trace saved by an earlier call (see :mod:`featcache.backbones.traced`) is
    loaded instead of building the network, and a new one is saved after building it.
    """
    from featcache.backbones import traced as tr

    if traced and (ready := tr.load_traced(identity, device)) is not None:
        return ready  # type: ignore[return-value]  # the same embed() and identity
    net = create_backbone(
        identity.backbone, identity.weights, pool=identity.pool, device=device, precision=identity.precision
    )
    differences = net.identity.differences(identity)
    if differences:
        raise FeatcacheError(
            f"the {identity.backbone} backbone available here differs from the one recorded "
            f"({'; '.join(differences)})"
        )
    if traced:
        tr.save_traced(net)
    return net


__all__ = [
    "POOLS",
    "PRECISIONS",
    "RANDOM",
    "Backbone",
    "BackboneEntry",
    "BackboneIdentity",
    "WeightsSource",
    "create_backbone",
    "get_entry",
    "list_backbones",
    "load_backbone",
    "register",
    "register_fallback",
    "backbone_for",
    "resolve_device",
]
