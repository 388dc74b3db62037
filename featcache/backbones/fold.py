"""Fold each BatchNorm into the convolution that feeds it, for inference.

In eval mode a BatchNorm is a per-channel affine map, so ``bn(conv(x))`` equals one convolution
with rescaled weights and a bias. Which convolution feeds which BatchNorm is read from a
``torch.fx`` trace of the forward pass (not guessed from module order), and a pair is folded
only when the convolution's output goes nowhere else. The model keeps running as ordinary eager
code; only the modules are swapped.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from featcache.errors import FeatcacheWarning

log = logging.getLogger(__name__)


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


class _Features(nn.Module):
    def __init__(self, model: nn.Module, features: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model = model
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.model, x)


def _after_fold(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What is left of ``bn`` once its affine map has moved into the convolution (None: unknown)."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "drop") and hasattr(bn, "act"):
        return nn.Sequential(bn.drop, bn.act)  # timm: batch_norm, then drop, then act
    return None


@torch.no_grad()
def fold_batchnorm(model: nn.Module, features: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> int:
    """Fold, in place, the BatchNorms of ``model`` that directly follow a convolution on the path
    ``features(model, x)``; return how many were folded (0 when the model cannot be traced)."""
    if model.training:
        raise ValueError("BatchNorm can only be folded in eval mode")
    root = _Features(model, features)
    try:
        graph = _LeafTracer().trace(root)
    except Exception as e:  # an untraceable model still runs, unfolded
        log.debug("BatchNorm folding: cannot trace %s", type(model).__name__, exc_info=True)
        warnings.warn(
            f"{type(model).__name__}: its BatchNorms could not be folded ({type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0][:200]}); it runs unfolded, slower, with the same features",
            FeatcacheWarning,
            stacklevel=3,
        )
        return 0
    modules = dict(root.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    folded = 0
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        conv = modules.get(src.target) if src.op == "call_module" else None
        rest = _after_fold(bn)
        if not isinstance(conv, nn.Conv2d) or rest is None or bn.running_mean is None:
            continue
        if len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1:
            continue  # the convolution's output, or one of the modules, is used elsewhere too
        root.set_submodule(src.target, fuse_conv_bn_eval(conv, bn))
        root.set_submodule(node.target, rest)
        folded += 1
    return folded
