"""torchvision's MobileNetV2: the default backbone (the course's network).

torchvision is imported only when the network is built, so that importing featcache stays cheap;
the weights addresses are torchvision's (a test checks that they still agree).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from featcache.backbones.identity import BackboneEntry, Preprocessing, WeightsSource
from featcache.backbones.registry import register

if TYPE_CHECKING:
    from torch import nn

_HUB = "https://download.pytorch.org/models/"


def _source(name: str, filename: str, description: str) -> WeightsSource:
    return WeightsSource(name, filename, _HUB + filename, description=description)


def _build() -> nn.Module:
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(weights=None)


register(
    BackboneEntry(
        name="mobilenet_v2",
        description="torchvision MobileNetV2, ImageNet; 1280-d (the course's backbone)",
        feature_dim=1280,
        preprocessing=Preprocessing(size=224, resize="stretch", interpolation="bilinear"),
        weights=(
            _source("IMAGENET1K_V1", "mobilenet_v2-b0353104.pth", "ImageNet 71.9% top-1, the classic recipe"),
            _source("IMAGENET1K_V2", "mobilenet_v2-7ebf99e0.pth", "ImageNet 72.2% top-1, the newer recipe"),
        ),
        build=_build,
        features=lambda model, x: model.features(x),
        head=lambda model: model.classifier,
    )
)
