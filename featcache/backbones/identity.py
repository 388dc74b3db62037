"""The identity of a set of features: what produced them, written into every cache and model and
compared, never rebuilt by hand; and :func:`digest`, the one way a value becomes a short key.
Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from featcache.backbones.entry import LAST
from featcache.difference import Difference
from featcache.preprocessing import Preprocessing

if TYPE_CHECKING:
    import numpy as np

RANDOM = "random"
"""The weights name that asks for untrained weights (plumbing tests only)."""


def digest(*parts: Any, length: int = 24) -> str:
    """A short hex key of ``parts`` (JSON data; identities as their dicts): the first ``length``
    characters of the SHA-256 of their JSON with sorted keys."""
    text = json.dumps(list(parts), sort_keys=True, default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"{type(value).__name__} is not JSON data")


@dataclass(frozen=True)
class BackboneIdentity:
    """What produced a set of features: compared, never rebuilt by hand.

    ``weights`` is a weights name (``IMAGENET1K_V1``), ``random``, or the absolute path of an
    explicit weights file; ``weights_sha256`` identifies the tensors themselves. ``precision`` is
    the arithmetic of the forward pass (``fp32``, or ``bf16`` autocast). ``layers`` lists the
    pooled layers, concatenated in that order (:meth:`BackboneEntry.resolve_layers` form).
    ``maps`` is the stage whose unpooled maps a cache keeps beside the features (None: none).
    ``tuned`` is ``STAGE:SHA256`` when the network after stage STAGE carries fine-tuned weights
    (the arrays of a model bundle with that digest, :func:`tuned_id`), else empty.
    """

    backbone: str
    weights: str
    weights_sha256: str
    preprocessing: Preprocessing
    pool: str
    feature_dim: int
    precision: str = "fp32"
    layers: str = LAST
    maps: int | None = None
    tuned: str = ""

    @property
    def tuned_stage(self) -> int | None:
        """The stage after which the weights are fine-tuned, or None."""
        return int(self.tuned.split(":")[0]) if self.tuned else None

    def to_dict(self) -> dict[str, Any]:
        optional = {"maps": self.maps} if self.maps is not None else {}
        if self.tuned:
            optional["tuned"] = self.tuned
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing.to_dict(),
            "pool": self.pool,
            "feature_dim": self.feature_dim,
            "precision": self.precision,
            "layers": self.layers,
            **optional,
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
            layers=d.get("layers", LAST),
            maps=None if d.get("maps") is None else int(d["maps"]),
            tuned=str(d.get("tuned", "")),
        )

    def differences(self, other: BackboneIdentity) -> list[Difference]:
        """What differs from ``other`` (empty when the features are interchangeable); weights are
        told apart by their SHA-256 and shown by name and the start of it."""
        out = []
        keys = ("backbone", "weights_sha256", "preprocessing", "layers", "pool", "feature_dim", "precision",
                "maps", "tuned")  # fmt: skip
        for key in keys:
            mine, theirs = getattr(self, key), getattr(other, key)
            if key == "preprocessing":
                out += mine.differences(theirs)
            elif key == "weights_sha256" and mine != theirs:
                shown = f"{self.weights} ({mine[:12]})", f"{other.weights} ({theirs[:12]})"
                out.append(Difference("weights", *shown))
            elif mine != theirs:
                out.append(Difference(key, mine, theirs))
        return out


def tuned_id(stage: int, arrays: Mapping[str, np.ndarray]) -> str:
    """The ``tuned`` of an identity whose network after ``stage`` holds the fine-tuned ``arrays``."""
    return f"{stage}:{arrays_sha256(arrays)}"


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """Hex SHA-256 of named arrays (names, dtypes, shapes and bytes, in name order)."""
    import numpy as np

    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()
