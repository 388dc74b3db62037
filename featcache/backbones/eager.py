"""The backbone as a PyTorch module running eagerly: BatchNorm folded, ``channels_last``."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import torch
from torch import nn

from featcache.backbones.embedder import Described
from featcache.backbones.entry import BackboneEntry, split_layers
from featcache.backbones.fold import fold_batchnorm
from featcache.backbones.identity import BackboneIdentity
from featcache.backbones.normalize import normalize
from featcache.errors import FeatcacheError


class EagerBackbone(Described, nn.Module):
    """A frozen network that maps images to pooled embeddings, with the identity that describes it.

    With ``optimize`` (the default) BatchNorms are folded into their convolutions and the model
    runs in ``channels_last`` layout: the same function, faster, equal up to float rounding.
    The stages that the identity's ``layers`` name, and the stage whose maps it keeps
    (``identity.maps``), are read on the way through the network (forward hooks), so everything
    comes out of one pass. With ``maps``, :meth:`forward` returns the pooled embeddings and those
    maps.
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
        self.stages, self.last = split_layers(identity.layers)
        self._seen = threading.local()
        for i in sorted({*self.stages, *([] if identity.maps is None else [identity.maps])}):
            self.model.get_submodule(entry.stages[i].module).register_forward_hook(self._keep(i))

    def _keep(self, index: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            seen = getattr(self._seen, "maps", None)
            if seen is not None:
                seen[index] = output

        return hook

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def layer_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised N×3×H×W batch → the float32 outputs of the identity's layers, in order (each
        N×C×h×w, or N×C when the network pools it itself), computed in the identity's precision;
        with ``identity.maps``, that stage's output follows them."""
        if self.optimized:
            x = x.contiguous(memory_format=torch.channels_last)
        bf16 = self.identity.precision == "bf16"
        self._seen.maps = {}
        try:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                last = self.entry.features(self.model, x)
            maps = [self._seen.maps[i] for i in self.stages] + ([last] if self.last else [])
            if self.identity.maps is not None:
                maps.append(self._seen.maps[self.identity.maps])
        finally:
            self._seen.maps = {}
        for i, m in zip(self.stages, maps, strict=False):
            channels = self.entry.stages[i].channels
            if m.ndim != 4 or m.shape[1] != channels:
                raise FeatcacheError(
                    f"layers: stage {i} of {self.entry.name} gives {tuple(m.shape)}, not an N×{channels}×h×w "
                    "feature map that can be pooled; choose other layers"
                )
        return [m.float() for m in maps]

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalised N×3×H×W batch → N×D pooled embeddings (the layers' pooled vectors,
        concatenated), and with ``identity.maps`` that stage's N×C×h×w maps."""
        maps = self.layer_maps(x)
        if self.identity.maps is None:
            return torch.cat([pooled(m, self.identity.pool) for m in maps], dim=1)
        return torch.cat([pooled(m, self.identity.pool) for m in maps[:-1]], dim=1), maps[-1]

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """N×H×W×3 uint8 pixels (from :func:`featcache.images.load_pixels`) → N×D float32 embeddings."""
        out = self(normalize(pixels, self.preprocessing).to(self.device))
        return (out[0] if isinstance(out, tuple) else out).float().cpu().numpy()

    @torch.inference_mode()
    def embed_maps(self, pixels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`embed`, and the float32 maps of stage ``identity.maps`` from the same pass."""
        if self.identity.maps is None:
            raise ValueError("this backbone keeps no maps (its identity has maps=None)")
        features, maps = self(normalize(pixels, self.preprocessing).to(self.device))
        return features.float().cpu().numpy(), maps.float().cpu().numpy()

    @torch.inference_mode()
    def imagenet_logits(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """ImageNet class logits for N×H×W×3 uint8 pixels (a check that weights and preprocessing fit)."""
        x = normalize(pixels, self.preprocessing).to(self.device)
        if self.optimized:
            x = x.contiguous(memory_format=torch.channels_last)
        maps = self.entry.features(self.model, x).float()
        return self.entry.head(self.model)(pooled(maps, "avg"))


def pooled(maps: torch.Tensor, pool: str) -> torch.Tensor:
    """N×C×h×w maps → N×C (``avg``, ``max``) or N×2C (``avgmax``: average then max); N×C stays."""
    if maps.ndim == 2:
        return maps
    if pool == "avg":
        return maps.mean(dim=(2, 3))
    if pool == "max":
        return maps.amax(dim=(2, 3))
    return torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)


def state_sha256(model: nn.Module) -> str:
    """Hex SHA-256 of a model's tensors (names and bytes): the identity of weights that have no file."""
    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
