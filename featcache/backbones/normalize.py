"""Pixels to a network's input tensor: what every engine that runs on PyTorch does first."""

from __future__ import annotations

import numpy as np
import torch

from featcache.preprocessing import Preprocessing


def normalize(batch: np.ndarray | torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Turn an N×H×W×3 uint8 batch into an N×3×H×W float32 tensor scaled and normalised per ``prep``."""
    if isinstance(batch, np.ndarray) and not batch.flags.writeable:
        batch = batch.copy()
    x = torch.as_tensor(batch)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected an N×H×W×3 uint8 batch, got {tuple(x.shape)} {x.dtype}")
    mean = torch.tensor(prep.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    return x.sub_(mean).div_(std).contiguous()
