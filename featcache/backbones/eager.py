"""The backbone as a PyTorch module running eagerly: BatchNorm folded, ``channels_last``."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from featcache.backbones.fold import fold_batchnorm
from featcache.backbones.identity import BackboneEntry, BackboneIdentity, Described
from featcache.images import normalize


class EagerBackbone(Described, nn.Module):
    """A frozen network that maps images to pooled embeddings, with the identity that describes it.

    With ``optimize`` (the default) BatchNorms are folded into their convolutions and the model
    runs in ``channels_last`` layout: the same function, faster, equal up to float rounding.
    """

    engine = "torch"

    def __init__(
        self, entry: BackboneEntry, model: nn.Module, identity: BackboneIdentity, optimize: bool = True
    ):
        super().__init__()
        self.entry = entry
        self.model = model.eval().requires_grad_(False)
        self.identity = identity
        self.optimized = optimize
        self.folded = 0
        if optimize:
            self.folded = fold_batchnorm(self.model, entry.features)
            self.model.to(memory_format=torch.channels_last)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised N×3×H×W batch → the backbone's float32 output, in the identity's precision."""
        if self.optimized:
            x = x.contiguous(memory_format=torch.channels_last)
        bf16 = self.identity.precision == "bf16"
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            maps = self.entry.features(self.model, x)
        return maps.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised N×3×H×W batch → N×D pooled embeddings."""
        maps = self.feature_maps(x)
        if maps.ndim == 2:
            return maps
        if self.identity.pool == "avg":
            return maps.mean(dim=(2, 3))
        if self.identity.pool == "max":
            return maps.amax(dim=(2, 3))
        return torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """N×H×W×3 uint8 pixels (from :func:`featcache.images.load_pixels`) → N×D float32 embeddings."""
        x = normalize(pixels, self.preprocessing).to(self.device)
        return self(x).float().cpu().numpy()

    @torch.inference_mode()
    def imagenet_logits(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """ImageNet class logits for N×H×W×3 uint8 pixels (a check that weights and preprocessing fit)."""
        x = normalize(pixels, self.preprocessing).to(self.device)
        maps = self.feature_maps(x)
        pooled = maps if maps.ndim == 2 else maps.mean(dim=(2, 3))
        return self.entry.head(self.model)(pooled)


def state_sha256(model: nn.Module) -> str:
    """Hex SHA-256 of a model's tensors (names and bytes): the identity of weights that have no file."""
    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
