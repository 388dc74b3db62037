"""Traced backbones kept on disk, so that a new process can skip building the network.

Building a backbone imports torchvision or timm, constructs the network and loads its weights
(seconds, the bulk of a cold ``featcache predict``); loading a TorchScript trace of the
optimised network needs torch alone. Traces are kept in :func:`featcache.files.user_cache_dir`,
one file per backbone identity, torch version and device type, written whole or not at all. A
trace is saved only after it has reproduced the network's output exactly, on a batch size other
than the one it was traced with. bf16 backbones are not traced (autocast inside TorchScript does
not round like eager autocast), nor those that return maps for a cache.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from featcache._version import __version__
from featcache.backbones.embedder import Described
from featcache.backbones.identity import BackboneIdentity, digest
from featcache.backbones.normalize import normalize
from featcache.files import replaced_atomically, user_cache_dir

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from featcache.backbones.eager import EagerBackbone


def trace_path(identity: BackboneIdentity, device: str | torch.device) -> Path:
    """Where the trace of the backbone ``identity`` describes, on ``device``, is kept."""
    key = digest(identity, torch.__version__, __version__, torch.device(device).type)
    return user_cache_dir() / "traced" / f"{identity.backbone}-{key}.pt"


class TracedBackbone(Described):
    """A backbone loaded from its trace: the same :meth:`embed` and identity as the one traced."""

    engine = "torch"

    def __init__(self, module: torch.jit.ScriptModule, identity: BackboneIdentity, device: torch.device):
        self.module = module
        self.identity = identity
        self.device = device

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """N×H×W×3 uint8 pixels → N×D float32 embeddings."""
        x = normalize(pixels, self.preprocessing).to(self.device)
        return self.module(x).float().cpu().numpy()


def load_traced(identity: BackboneIdentity, device: str | torch.device) -> TracedBackbone | None:
    """The saved trace of ``identity`` on ``device``, or None when there is none (or it is unreadable)."""
    path = trace_path(identity, device)
    if identity.precision != "fp32" or identity.maps is not None or not path.is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notice
            module = torch.jit.load(str(path), map_location=device)
    except Exception:  # a damaged trace is rebuilt, never fatal
        log.debug("the saved trace %s does not load; it is rebuilt", path, exc_info=True)
        return None
    return TracedBackbone(module.eval(), identity, torch.device(device))


def save_traced(net: EagerBackbone) -> Path | None:
    """Trace ``net``, check the trace against it, and save it; None when it cannot be traced exactly."""
    if net.identity.precision != "fp32" or net.identity.maps is not None:
        return None
    size = net.preprocessing.size
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(3, 3, size, size, generator=generator).to(net.device)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            module = torch.jit.trace(net, probe[:1], check_trace=False)
            if not torch.equal(module(probe), net(probe)):
                return None
            path = trace_path(net.identity, net.device)
            path.parent.mkdir(parents=True, exist_ok=True)
            with replaced_atomically(path) as tmp:
                torch.jit.save(module, str(tmp))
    except Exception:  # tracing is an optimisation: the eager backbone still works
        log.debug("%s cannot be traced; it runs eagerly", net.identity.backbone, exc_info=True)
        return None
    return path
