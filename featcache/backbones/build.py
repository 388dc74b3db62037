"""The one way to build a backbone: :func:`build_backbone` returns an :class:`Embedder`.

A backbone is built from its name and settings, or from the identity recorded in a cache or a
model. A trace saved by an earlier run is loaded when there is one (torch alone, no
torchvision or timm, no network construction); otherwise the network is built eagerly and a
trace of it is saved for next time.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from featcache.backbones.eager import EagerBackbone, state_sha256
from featcache.backbones.identity import RANDOM, BackboneEntry, BackboneIdentity, Embedder
from featcache.backbones.registry import get_entry
from featcache.backbones.traced import load_traced, save_traced
from featcache.backbones.weights import DownloadProgress, file_sha256, resolve_weights
from featcache.choices import DEFAULT_BACKBONE, DEVICES, PRECISIONS
from featcache.errors import FeatcacheError, FeatcacheWarning


def build_backbone(
    backbone: str | BackboneIdentity = DEFAULT_BACKBONE,
    *,
    weights: str | None = None,
    pool: str = "avg",
    precision: str = "fp32",
    device: str = "cpu",
    traced: bool = True,
    optimize: bool = True,
    download: bool = True,
    on_download: DownloadProgress | None = None,
) -> Embedder:
    """Build ``backbone`` (a registered name, or the :class:`BackboneIdentity` of a cache or model).

    ``weights`` is a weights name, a file path or ``"random"`` (untrained, for tests; warns);
    weights files are found as an explicit path, then in the torch hub cache, then downloaded
    with their hash checked (unless ``download`` is false or ``FEATCACHE_OFFLINE=1``), reporting
    bytes to ``on_download``. ``precision`` is ``fp32`` or ``bf16`` (autocast); ``device`` is
    ``cpu``, ``cuda`` or ``auto``. With ``traced``, a saved trace stands in for the network.
    ``optimize=False`` keeps the network exactly as built (no BatchNorm folding, never traced).

    Given an identity, the other settings come from it, and weights at hand that are not the
    recorded ones are refused.
    """
    device = resolve_device(device)
    wanted = backbone if isinstance(backbone, BackboneIdentity) else None
    if wanted is not None:
        if traced and optimize and (ready := load_traced(wanted, device)) is not None:
            return ready
        backbone, weights, pool, precision = wanted.backbone, wanted.weights, wanted.pool, wanted.precision
    entry = _checked_entry(backbone, pool, precision)
    weights = weights or entry.default_weights
    traced = traced and optimize and weights != RANDOM
    if weights == RANDOM:
        net = _eager(entry, RANDOM, None, pool, precision, device, optimize)
    else:
        label, path = resolve_weights(entry, weights, download=download, on_progress=on_download)
        sha = file_sha256(path)
        identity = BackboneIdentity(
            entry.name, label, sha, entry.preprocessing, pool, entry.pooled_dim(pool), precision
        )
        if traced and wanted is None and (ready := load_traced(identity, device)) is not None:
            return ready
        net = _eager(entry, label, path, pool, precision, device, optimize, sha)
    if wanted is not None and (differences := net.identity.differences(wanted)):
        raise FeatcacheError(
            f"the {wanted.backbone} backbone available here differs from the one recorded "
            f"({'; '.join(differences)})"
        )
    if traced:
        save_traced(net)
    return net


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is usable, else ``cpu``; errors for an unusable choice."""
    if device not in DEVICES:
        raise FeatcacheError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise FeatcacheError("device 'cuda': no CUDA GPU is available here (use device='cpu' or 'auto')")
    return device


def _checked_entry(name: str, pool: str, precision: str) -> BackboneEntry:
    entry = get_entry(name)
    if pool not in entry.pools:
        raise FeatcacheError(f"pool {pool!r} is not available for {name}: choose one of {entry.pools}")
    if precision not in PRECISIONS:
        raise FeatcacheError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return entry


def _eager(
    entry: BackboneEntry,
    label: str,
    path: Path | None,
    pool: str,
    precision: str,
    device: str,
    optimize: bool,
    sha: str | None = None,
) -> EagerBackbone:
    """The network of ``entry`` with the weights file ``path`` (whose SHA-256 is ``sha``), or random."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = entry.build()
    if path is None:
        warnings.warn(
            f"{entry.name} uses random weights: its features are meaningless for classification",
            FeatcacheWarning,
            stacklevel=3,
        )
        sha = state_sha256(model)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any unreadable file: say which one
            raise FeatcacheError(f"cannot load weights file {path}: {e}") from None
        try:
            entry.load(model, state)
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0]
            raise FeatcacheError(f"weights file {path} does not fit backbone {entry.name}: {first}") from None
    identity = BackboneIdentity(
        entry.name, label, sha, entry.preprocessing, pool, entry.pooled_dim(pool), precision
    )
    return EagerBackbone(entry, model, identity, optimize=optimize).to(device)
