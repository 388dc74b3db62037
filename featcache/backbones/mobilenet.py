"""torchvision's MobileNetV2: the default backbone (the course's network)."""

from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from featcache.backbones.registry import BackboneEntry, WeightsSource, register
from featcache.images import Preprocessing


def _source(w: MobileNet_V2_Weights, description: str) -> WeightsSource:
    return WeightsSource(w.name, w.url.rsplit("/", 1)[-1], w.url, description=description)


register(
    BackboneEntry(
        name="mobilenet_v2",
        description="torchvision MobileNetV2, ImageNet; 1280-d (the course's backbone)",
        feature_dim=1280,
        preprocessing=Preprocessing(size=224, resize="stretch", interpolation="bilinear"),
        weights=(
            _source(MobileNet_V2_Weights.IMAGENET1K_V1, "ImageNet 71.9% top-1, the classic recipe"),
            _source(MobileNet_V2_Weights.IMAGENET1K_V2, "ImageNet 72.2% top-1, the newer recipe"),
        ),
        build=lambda: mobilenet_v2(weights=None),
        features=lambda model, x: model.features(x),
        head=lambda model: model.classifier,
    )
)
