"""What a backbone family is, as plain data: its entry (how to build it, its weights sources, its
preprocessing), and the stages whose outputs ``--layers`` and ``--maps`` name. Nothing here imports
torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from featcache.choices import POOLS
from featcache.preprocessing import Preprocessing

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class WeightsSource:
    """Where one named set of weights comes from.

    ``filename`` is the file's name in the torch hub cache (``<hub>/checkpoints/``); when it
    carries a hash prefix (``name-<hex>.pth``) the file is checked against it. ``bundled`` finds a
    copy already on the machine elsewhere (inside an installed package, or in another library's
    cache), ``url`` is the download address, and ``fetch`` (when given) downloads it the way its
    library does and returns the path, instead of featcache saving ``url`` into the hub cache.
    """

    name: str
    filename: str
    url: str | None = None
    bundled: Callable[[], Path | None] | None = None
    description: str = ""
    fetch: Callable[[], Path] | None = None


@dataclass(frozen=True)
class Stage:
    """One stage of a backbone whose output ``--layers`` can pool: the module's qualified name in
    the network, its output channels and its stride (input size / output size)."""

    module: str
    channels: int
    reduction: int


LAST = "last"
"""The layer name of the backbone's final features (what the classifier pools)."""
MULTI = "multi"
"""The layers preset of each backbone family, chosen by measurement (``BackboneEntry.multi``)."""


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
    stages: tuple[Stage, ...] = ()
    multi: str = LAST
    top: Callable[[nn.Module, int], nn.Module] | None = None
    """``top(model, i)``: the part of ``model`` after stage ``i`` (the later stages and the head
    convolution) as one module, mapping stage ``i``'s maps to the last layer's unpooled maps;
    None when the backbone cannot be fine-tuned from cached maps."""

    @property
    def default_weights(self) -> str:
        return self.weights[0].name

    def weights_source(self, name: str) -> WeightsSource | None:
        return next((w for w in self.weights if w.name == name), None)

    def resolve_layers(self, spec: str = LAST) -> str:
        """The canonical form of the layers ``spec``: ``last``, ``multi`` (this family's preset) or
        stage indices and ``last`` separated by commas (``4,5,6,last``), in network order.

        Raises ``ValueError`` saying what is allowed when ``spec`` names no layers of this backbone.
        """
        spec = spec.strip().lower()
        if spec == MULTI:
            return self.multi
        parts = [p.strip() for p in spec.split(",")]
        allowed = (
            f"stage indices 0-{len(self.stages) - 1} (see 'featcache backbones --layers {self.name}')"
            if self.stages
            else f"no stages ({self.name} offers its last layer only)"
        )
        wanted: set[int] = set()
        for part in parts:
            if part == LAST:
                continue
            if not part.isdigit() or int(part) >= len(self.stages):
                raise ValueError(
                    f"layers {spec!r}: {part!r} is not a layer of {self.name}; use {LAST!r}, {MULTI!r}, "
                    f"or a comma-separated list of {allowed} and {LAST!r}"
                )
            if int(part) in wanted:
                raise ValueError(f"layers {spec!r}: stage {part} is listed twice")
            wanted.add(int(part))
        return ",".join([*map(str, sorted(wanted)), *([LAST] if LAST in parts else [])])

    def layers_dim(self, layers: str) -> int:
        """Channels of the layers ``layers`` before pooling, all together."""
        indices, last = split_layers(self.resolve_layers(layers))
        return sum(self.stages[i].channels for i in indices) + (self.feature_dim if last else 0)

    def check_maps(self, stage: int) -> None:
        """Raise ``ValueError``, saying what is allowed, unless the maps of ``stage`` can be cached and
        the network above it fine-tuned."""
        if self.top is None or not self.stages:
            raise ValueError(f"maps: {self.name} cannot be fine-tuned from cached maps")
        if not isinstance(stage, int) or not 0 <= stage < len(self.stages):
            raise ValueError(
                f"maps: {stage!r} is not a stage of {self.name}; use a stage index 0-{len(self.stages) - 1} "
                f"(see 'featcache backbones --layers {self.name}')"
            )

    def maps_shape(self, stage: int) -> tuple[int, int, int]:
        """Channels, height and width of stage ``stage``'s maps at the input size."""
        s = self.stages[stage]
        side = -(-self.preprocessing.size // s.reduction)
        return (s.channels, side, side)

    def pooled_dim(self, pool: str, layers: str = LAST) -> int:
        """Length of the embedding with pooling ``pool`` of the layers ``layers``."""
        return self.layers_dim(layers) * (2 if pool == "avgmax" else 1)


def split_layers(layers: str) -> tuple[list[int], bool]:
    """The stage indices of canonical ``layers``, and whether it includes the last layer."""
    parts = layers.split(",")
    return [int(p) for p in parts if p != LAST], LAST in parts
