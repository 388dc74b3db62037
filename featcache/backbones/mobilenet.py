"""torchvision's MobileNetV2: the default backbone (the course's network).

torchvision is imported only when the network is built, so that importing featcache stays cheap;
the weights addresses are torchvision's (a test checks that they still agree).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from featcache.backbones.efficientnet_lite import MULTI as LITE_MULTI
from featcache.backbones.entry import BackboneEntry, Stage, WeightsSource
from featcache.backbones.registry import register
from featcache.preprocessing import Preprocessing

if TYPE_CHECKING:
    from torch import nn

_HUB = "https://download.pytorch.org/models/"
# the inverted-residual stages of the paper's Table 2: where each ends in ``features``, its channels, stride
_STAGES = ((1, 16, 2), (3, 24, 4), (6, 32, 8), (10, 64, 16), (13, 96, 16), (16, 160, 32), (17, 320, 32))


def _source(name: str, filename: str, description: str) -> WeightsSource:
    return WeightsSource(name, filename, _HUB + filename, description=description)


def _top(model: nn.Module, stage: int) -> nn.Module:
    from torch import nn

    return nn.Sequential(*model.features[_STAGES[stage][0] + 1 :])


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
        stages=tuple(Stage(f"features.{end}", c, r) for end, c, r in _STAGES),
        multi=LITE_MULTI,  # the same seven-stage layout as EfficientNet-Lite, whose preset was measured
        top=_top,
    )
)
