"""Any other torchvision classification model by name (``resnet50``, ``mobilenet_v3_large`` ...).

The embedding is the input of the model's last linear layer (its pre-logits vector), so only
the architecture's own pooling is available.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from featcache.backbones.entry import BackboneEntry, WeightsSource
from featcache.backbones.registry import register_fallback
from featcache.preprocessing import Preprocessing

if TYPE_CHECKING:
    import torch
    from torch import nn


def _last_linear(model: nn.Module) -> nn.Linear:
    from torch import nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear classifier")
    return linears[-1]


def _pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = _last_linear(model).register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[0]


@cache
def torchvision_entry(name: str) -> BackboneEntry | None:
    """A registry entry for torchvision classification model ``name``, or None if there is none."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        return None
    enum = torchvision.models.get_model_weights(name)
    default = enum.DEFAULT
    tf = default.transforms()
    size = tf.crop_size[0]
    interpolation = "bicubic" if "BICUBIC" in str(tf.interpolation) else "bilinear"
    sources = [WeightsSource(default.name, default.url.rsplit("/", 1)[-1], default.url)]
    sources += [
        WeightsSource(w.name, w.url.rsplit("/", 1)[-1], w.url) for w in enum if w.name != default.name
    ]
    feature_dim = _last_linear(torchvision.models.get_model(name, weights=None)).in_features
    return BackboneEntry(
        name=name,
        description=f"torchvision {name}",
        feature_dim=feature_dim,
        preprocessing=Preprocessing(
            size=size,
            resize="stretch",
            interpolation=interpolation,
            mean=tuple(tf.mean),
            std=tuple(tf.std),
        ),
        weights=tuple(sources),
        build=lambda: torchvision.models.get_model(name, weights=None),
        features=_pre_logits,
        head=_last_linear,
        pools=("avg",),
    )


register_fallback(torchvision_entry)
