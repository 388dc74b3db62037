"""What a backbone is, as plain data: its entry, its weights sources, its preprocessing and the
identity written into every cache and model. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from featcache.choices import INTERPOLATIONS, POOLS, RESIZE_POLICIES

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

RANDOM = "random"
"""The weights name that asks for untrained weights (plumbing tests only)."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input tensor.

    ``resize`` is ``"stretch"`` (straight to size×size, no crop: the course recipe) or
    ``"center_crop"`` (shorter side to ``size``, then the central square). With ``jpeg_draft``,
    a JPEG at least twice the size on both sides is decoded at 1/2, 1/4 or 1/8 scale in the DCT
    domain (never below ``size``) before the resize: about 14 times faster on a 4032×3024
    photo, and within a grey level of the full decode.
    """

    size: int = 224
    resize: str = "stretch"
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    jpeg_draft: bool = True

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """Read :meth:`to_dict`'s form; one recorded before ``jpeg_draft`` existed decoded in full."""
        return cls(**{"jpeg_draft": False, **d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def differences(self, other: Preprocessing) -> list[str]:
        """The fields that differ from ``other``, as ``name: mine vs theirs``."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k]]


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


def _load_state_dict(model: nn.Module, state: dict) -> None:
    model.load_state_dict(state)


@dataclass(frozen=True)
class BackboneEntry:
    """Everything featcache needs to know about one backbone family.

    ``build()`` returns the architecture (with its ImageNet classifier) and no trained weights;
    ``load(model, state_dict)`` puts a weights file into it; ``features(model, x)`` maps a
    normalised N×3×H×W batch to N×C×h×w feature maps (or to N×C embeddings already pooled, in
    which case ``pools`` is ``("avg",)``); ``head(model)`` is the ImageNet classifier that takes
    the average-pooled embedding (used to check that weights and preprocessing are right).
    The callables import torch when they run, not when the entry is made.
    """

    name: str
    description: str
    feature_dim: int
    preprocessing: Preprocessing
    weights: tuple[WeightsSource, ...]
    build: Callable[[], nn.Module]
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    head: Callable[[nn.Module], nn.Module]
    load: Callable[[nn.Module, dict], None] = _load_state_dict
    pools: tuple[str, ...] = POOLS

    @property
    def default_weights(self) -> str:
        return self.weights[0].name

    def weights_source(self, name: str) -> WeightsSource | None:
        return next((w for w in self.weights if w.name == name), None)

    def pooled_dim(self, pool: str) -> int:
        """Length of the embedding with pooling ``pool``."""
        return self.feature_dim * (2 if pool == "avgmax" else 1)


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
            if key == "preprocessing":
                out += [f"preprocessing {d}" for d in mine.differences(theirs)]
            elif mine != theirs:
                if key == "weights_sha256":
                    mine, theirs = f"{self.weights} ({mine[:12]})", f"{other.weights} ({theirs[:12]})"
                out.append(f"{key}: {mine} vs {theirs}")
        return out


@runtime_checkable
class Embedder(Protocol):
    """A built backbone, whatever runs it: N×H×W×3 uint8 pixels in, N×D float32 embeddings out.

    ``pixels`` come from :func:`featcache.images.load_pixels` at ``preprocessing.size``;
    ``engine`` names what runs the network (``openvino`` or ``torch``).
    """

    identity: BackboneIdentity
    engine: str

    @property
    def preprocessing(self) -> Preprocessing: ...

    @property
    def feature_dim(self) -> int: ...

    def embed(self, pixels: np.ndarray) -> np.ndarray: ...


class Described:
    """The parts of an :class:`Embedder` that its identity alone determines."""

    identity: BackboneIdentity

    @property
    def preprocessing(self) -> Preprocessing:
        return self.identity.preprocessing

    @property
    def feature_dim(self) -> int:
        return self.identity.feature_dim
