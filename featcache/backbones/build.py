"""The one way to build a backbone: :func:`build_backbone` returns an :class:`Embedder`.

A backbone is built from its name and settings, or from the identity recorded in a cache or a
model, on an engine: OpenVINO on the CPU, PyTorch on a CUDA GPU (and on the CPU when asked, or
when a network does not convert). What an earlier run saved is loaded when it is there (an
OpenVINO IR, or a TorchScript trace): no network construction, and for OpenVINO no torch at all.
Otherwise the network is built eagerly in PyTorch, and what the engine needs is saved for next
time.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featcache.backbones.embedder import Embedder
from featcache.backbones.entry import BackboneEntry
from featcache.backbones.identity import RANDOM, BackboneIdentity, tuned_id
from featcache.backbones.registry import get_entry
from featcache.backbones.weights import DownloadProgress, resolve_weights
from featcache.choices import DEFAULT_BACKBONE, DEVICES, ENGINES, PRECISIONS
from featcache.difference import worded
from featcache.errors import FeatcacheError, FeatcacheWarning
from featcache.files import file_sha256
from featcache.settings import BackboneSpec, RunOptions, gather

if TYPE_CHECKING:
    from torch import nn

    from featcache.backbones.eager import EagerBackbone


def build_backbone(
    backbone: str | BackboneSpec | BackboneIdentity = DEFAULT_BACKBONE,
    run: RunOptions | None = None,
    *,
    traced: bool = True,
    optimize: bool = True,
    download: bool = True,
    on_download: DownloadProgress | None = None,
    top: Mapping[str, np.ndarray] | None = None,
    **settings: Any,
) -> Embedder:
    """Build ``backbone`` (a registered name or a :class:`~featcache.settings.BackboneSpec`, or the
    :class:`BackboneIdentity` of a cache or model) to run as ``run`` says (``device`` defaults to
    ``cpu`` here). ``settings`` are fields of either, by name (``weights="random"``, ``engine="torch"``).

    ``weights`` is a weights name, a file path or ``"random"`` (untrained, for tests; warns);
    weights files are found as an explicit path, then in the torch hub cache, then downloaded
    with their hash checked (unless ``download`` is false or ``FEATCACHE_OFFLINE=1``), reporting
    bytes to ``on_download``. ``layers`` is ``last``, ``multi`` or stage indices and ``last``
    (``4,5,6,last``): each layer is pooled with ``pool`` and the vectors are concatenated (see
    :meth:`~featcache.backbones.identity.BackboneEntry.resolve_layers`). With ``maps`` (a stage
    index), the backbone also returns that stage's maps (``embed_maps``). ``precision`` is
    ``fp32``, ``bf16`` or ``int8`` (OpenVINO only: quantised with NNCF); ``device`` is ``cpu``,
    ``cuda`` or ``auto``. ``engine`` is ``openvino`` (CPU only), ``torch``, or ``auto``: PyTorch
    on CUDA, else OpenVINO. With ``traced``, PyTorch on the CPU loads a saved trace instead of
    building the network. ``optimize=False`` keeps the PyTorch network exactly as built (no
    BatchNorm folding, never traced or converted).

    Given an identity, the other settings come from it, and weights at hand that are not the
    recorded ones are refused. An identity whose network is fine-tuned above a stage (``tuned``)
    runs from what an earlier run saved for it, or is built from ``top``, the fine-tuned arrays
    of its model bundle. The result's ``engine`` says which engine runs it.
    """
    wanted = backbone if isinstance(backbone, BackboneIdentity) else None
    if wanted is not None:
        spec = BackboneSpec(wanted.backbone, wanted.weights, wanted.pool, wanted.layers, wanted.maps,
                            wanted.precision)  # fmt: skip
    else:
        spec = backbone if isinstance(backbone, BackboneSpec) else BackboneSpec(backbone)
    spec, run = gather("build_backbone", settings, spec, run or RunOptions(device="cpu"))
    spec = spec.resolved()
    device = resolve_device(run.device)
    engine = resolve_engine(run.engine, device) if optimize else "torch"
    backbone, weights, pool, precision = spec.backbone, spec.weights, spec.pool, spec.precision
    layers, maps = spec.layers, spec.maps
    entry = _checked_entry(backbone, pool, precision)
    try:
        layers = entry.resolve_layers(layers)
        if maps is not None:
            entry.check_maps(maps)
    except ValueError as e:
        raise FeatcacheError(str(e)) from None
    weights = weights or entry.default_weights
    if precision == "int8" and optimize and engine != "openvino":
        raise FeatcacheError(
            f"precision 'int8' runs on the OpenVINO engine, on the CPU (this would run on {engine}, "
            f"{device}): pass engine='openvino' and device='cpu', or precision='fp32' or 'bf16'"
        )
    if precision == "bf16" and device == "cpu" and not cpu_has_bf16():
        warnings.warn(
            "this CPU has no bfloat16 instructions (AMX or AVX512-BF16): bf16 runs here, "
            + ("as fp32 would" if engine == "openvino" else "slower than fp32 would"),
            FeatcacheWarning,
            stacklevel=2,
        )
    label, path, sha = weights, None, None
    if weights != RANDOM and wanted is None:
        label, path = resolve_weights(entry, weights, download=download, on_progress=on_download)
        sha = file_sha256(path)
        wanted = spec_identity(entry, dataclasses.replace(spec, weights=label, layers=layers), sha)
    if wanted is not None and (ready := _saved(wanted, engine, device, traced and optimize)) is not None:
        return ready
    if wanted is not None and wanted.tuned and top is None:
        raise FeatcacheError(
            f"the fine-tuned {wanted.backbone} network has not been converted on this machine: load it from "
            "its model bundle (featcache.Predictor), which holds its fine-tuned weights"
        )
    if weights != RANDOM and path is None:
        label, path = resolve_weights(entry, weights, download=download, on_progress=on_download)
        sha = file_sha256(path)
    # the network PyTorch runs, or the fp32 one OpenVINO converts
    arithmetic = "fp32" if engine == "openvino" or precision == "int8" else precision
    tuned = (wanted.tuned_stage, top) if wanted is not None and top is not None else None
    spec = dataclasses.replace(spec, weights=label, layers=layers, precision=arithmetic)
    net = _eager(entry, spec, (path, sha), device, optimize, tuned)
    identity = dataclasses.replace(net.identity, precision=precision)
    if wanted is None and (ready := _saved(identity, engine, device, traced=False)) is not None:
        return ready  # random weights, converted by an earlier run
    if wanted is not None and (differences := identity.differences(wanted)):
        raise FeatcacheError(
            f"the {wanted.backbone} backbone available here differs from the one recorded "
            f"({worded(differences)})"
        )
    if engine == "openvino":
        from featcache.backbones.openvino_engine import save_openvino

        try:
            return save_openvino(net, identity)
        except Exception as e:  # any network the converter cannot take runs in PyTorch
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            if precision == "int8":
                raise FeatcacheError(f"{entry.name} cannot run in int8 on OpenVINO ({why})") from None
            warnings.warn(
                f"{entry.name} does not run on OpenVINO ({why}); running it in PyTorch instead",
                FeatcacheWarning,
                stacklevel=2,
            )
            net.identity = identity
    if traced and optimize and weights != RANDOM:
        from featcache.backbones.traced import save_traced

        save_traced(net)
    return net


def spec_identity(entry: BackboneEntry, spec: BackboneSpec, sha: str, tuned: str = "") -> BackboneIdentity:
    """The identity of the features ``entry`` makes as the resolved ``spec`` says (its ``weights``
    the name to record, its ``layers`` canonical), with weights of SHA-256 ``sha``."""
    dim = entry.pooled_dim(spec.pool, spec.layers)
    return BackboneIdentity(
        entry.name, spec.weights, sha, entry.preprocessing, spec.pool, dim, spec.precision, spec.layers,
        spec.maps, tuned,
    )  # fmt: skip


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is usable, else ``cpu``; errors for an unusable choice.

    On a machine without an NVIDIA device, ``auto`` is ``cpu`` without importing torch.
    """
    if device not in DEVICES:
        raise FeatcacheError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu" or (device == "auto" and "torch" not in sys.modules and not _nvidia_device()):
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise FeatcacheError("device 'cuda': no CUDA GPU is available here (use device='cpu' or 'auto')")
    return device


def resolve_engine(engine: str, device: str) -> str:
    """``auto`` → ``torch`` on a GPU, ``openvino`` on the CPU; errors for an unusable choice."""
    if engine not in ENGINES:
        raise FeatcacheError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "auto":
        return "torch" if device == "cuda" else "openvino"
    if engine == "openvino" and device != "cpu":
        raise FeatcacheError(
            "engine 'openvino' runs on the CPU: pass device='cpu', or engine='torch' for the GPU"
        )
    return engine


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AMX-BF16 or AVX512-BF16), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _nvidia_device() -> bool:
    """Whether the system shows a GPU device (NVIDIA's, or WSL's) that CUDA could use."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/dxg")


def _saved(identity: BackboneIdentity, engine: str, device: str, traced: bool) -> Embedder | None:
    """What an earlier run saved for ``identity`` on ``engine``, ready to run, or None."""
    if engine == "openvino":
        from featcache.backbones.openvino_engine import load_openvino

        return load_openvino(identity)
    if traced:
        from featcache.backbones.traced import load_traced

        return load_traced(identity, device)
    return None


def _checked_entry(name: str, pool: str, precision: str) -> BackboneEntry:
    entry = get_entry(name)
    if pool not in entry.pools:
        raise FeatcacheError(f"pool {pool!r} is not available for {name}: choose one of {entry.pools}")
    if precision not in PRECISIONS:
        raise FeatcacheError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return entry


def _eager(
    entry: BackboneEntry,
    spec: BackboneSpec,
    weights_file: tuple[Path | None, str | None],
    device: str,
    optimize: bool,
    tuned: tuple[int, Mapping[str, np.ndarray]] | None = None,
) -> EagerBackbone:
    """The network of ``entry`` with the weights file ``(path, SHA-256)`` (path None: random weights),
    as ``spec`` (resolved, its ``weights`` the name to record) says; with ``tuned``, ``(stage,
    arrays)``, the state of the part after that stage (``entry.top``) replaced by the arrays."""
    import torch

    from featcache.backbones.eager import EagerBackbone, state_sha256

    path, sha = weights_file
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
            state = _read_state(path)
        except Exception as e:  # any unreadable file: say which one
            raise FeatcacheError(f"cannot load weights file {path}: {e}") from None
        try:
            entry.load(model, state)
        except (RuntimeError, KeyError, ValueError) as e:
            first = " ".join(line.strip() for line in str(e).strip().splitlines()[:2])[:300]
            raise FeatcacheError(f"weights file {path} does not fit backbone {entry.name}: {first}") from None
    fine_tuned = ""
    if tuned is not None:
        load_top(entry, model, *tuned)
        fine_tuned = tuned_id(*tuned)
    identity = spec_identity(entry, spec, sha, fine_tuned)
    return EagerBackbone(entry, model, identity, optimize=optimize).to(device)


def load_top(entry: BackboneEntry, model: nn.Module, stage: int, state: Mapping[str, np.ndarray]) -> None:
    """Put the arrays ``state`` into the part of ``model`` after stage ``stage`` (``entry.top``)."""
    import torch

    top = entry.top(model, stage)
    try:
        top.load_state_dict({k: torch.from_numpy(np.asarray(v)).clone() for k, v in state.items()})
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:300]
        raise FeatcacheError(
            f"the fine-tuned weights do not fit {entry.name} after stage {stage}: {first}"
        ) from None


def _read_state(path: Path) -> dict:
    """The tensors of a weights file: safetensors (Hugging Face's format) or a PyTorch pickle,
    read without running code."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def pretrained_network(identity: BackboneIdentity, download: bool = True) -> tuple[BackboneEntry, nn.Module]:
    """The registry entry and the PyTorch network (as built, eval mode, frozen) with the weights
    that ``identity`` records; a one-line error when the weights at hand are not those."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FeatcacheWarning)  # random weights: said when they were extracted
        net = build_backbone(identity, device="cpu", optimize=False, download=download)
    return get_entry(identity.backbone), net.model
