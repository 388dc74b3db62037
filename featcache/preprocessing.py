"""How an image becomes a network's input: plain data that the image loader and the backbones share."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from featcache.choices import INTERPOLATIONS, RESIZE_POLICIES
from featcache.difference import Difference


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input tensor.

    ``resize`` is ``"stretch"`` (straight to size×size, no crop: the course recipe) or
    ``"center_crop"`` (shorter side to ``size / crop_pct``, then the central size×size square,
    as timm's evaluation transform does). With ``jpeg_draft``,
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
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.crop_pct <= 1 or (self.resize == "stretch" and self.crop_pct != 1):
            raise ValueError(f"crop_pct must be in (0, 1] (1 with resize 'stretch'), got {self.crop_pct!r}")
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

    def differences(self, other: Preprocessing) -> list[Difference]:
        """The fields that differ from ``other`` (named ``preprocessing.FIELD``)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [Difference(f"preprocessing.{k}", mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]]
