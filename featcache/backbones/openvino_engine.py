"""The backbone on OpenVINO, the fast engine on CPUs.

The folded network with its pooling (and, for a cache that keeps them, a stage's maps as a second
output), and the normalisation of uint8 pixels in front of it, is
converted once to OpenVINO IR and kept in :func:`featcache.files.user_cache_dir`, one folder per
backbone identity (fp32 and bf16 share one: bf16 is chosen when the model is compiled), OpenVINO
version and featcache version. The IR is saved only after it has reproduced the PyTorch network's
embeddings (cosine at least :data:`MIN_COSINE`). An ``int8`` identity has a folder of its own:
the fp32 IR quantised by :mod:`featcache.backbones.quantize`, kept only when its embeddings are
within :data:`~featcache.backbones.quantize.MIN_MEAN_COSINE` of fp32's. Each folder appears whole
or not at all, and a manifest of its files' SHA-256 is checked before each use: a damaged IR is
rebuilt, never run. Running it needs OpenVINO and NumPy, not torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import openvino as ov
from openvino.preprocess import PrePostProcessor

from featcache._version import __version__
from featcache.backbones.embedder import Described
from featcache.backbones.identity import BackboneIdentity, digest
from featcache.errors import FeatcacheError
from featcache.files import file_sha256, user_cache_dir

if TYPE_CHECKING:
    from featcache.backbones.eager import EagerBackbone

MIN_COSINE = 0.99999
"""How close the IR's fp32 embeddings must be to PyTorch's (the lowest cosine over a probe batch)."""
_FILES = ("model.xml", "model.bin")
_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: what is not quantised runs in f32


def ir_folder(identity: BackboneIdentity) -> Path:
    """Where the IR of the backbone ``identity`` describes is kept."""
    int8 = identity.precision == "int8"
    described = {**identity.to_dict(), "precision": "int8" if int8 else None}  # fp32's graph serves bf16
    key = digest(described, ov.__version__, __version__)
    return user_cache_dir() / "openvino" / f"{identity.backbone}{'-int8' if int8 else ''}-{key}"


class OpenVINOBackbone(Described):
    """A backbone compiled by OpenVINO for the CPU: the same :meth:`embed` and identity as PyTorch's."""

    engine = "openvino"

    def __init__(self, compiled: ov.CompiledModel, identity: BackboneIdentity):
        self.compiled = compiled
        self.identity = identity
        self._request = compiled.create_infer_request()

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """N×H×W×3 uint8 pixels (from :func:`featcache.images.load_pixels`) → N×D float32 embeddings."""
        return self._run(pixels)[0]

    def embed_maps(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`embed`, and the float32 maps of stage ``identity.maps`` from the same pass."""
        if self.identity.maps is None:
            raise ValueError("this backbone keeps no maps (its identity has maps=None)")
        features, maps = self._run(pixels)
        return features, maps

    def _run(self, pixels: np.ndarray) -> list[np.ndarray]:
        pixels = np.ascontiguousarray(pixels)
        size = self.preprocessing.size
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
            raise ValueError(f"expected an N×{size}×{size}×3 uint8 batch, got {pixels.shape} {pixels.dtype}")
        self._request.infer([pixels])
        outputs = len(self.compiled.outputs)
        return [np.array(self._request.get_output_tensor(i).data, dtype=np.float32) for i in range(outputs)]


def load_openvino(identity: BackboneIdentity) -> OpenVINOBackbone | None:
    """The saved IR of ``identity`` compiled in its precision, or None when there is none, or when its
    files do not match their manifest (it is then rebuilt by whoever asked). An ``int8`` IR that is
    missing or damaged is quantised again from the fp32 IR when that is intact."""
    folder = ir_folder(identity)
    if not _intact(folder):
        if identity.precision == "int8":
            fp32 = ir_folder(dataclasses.replace(identity, precision="fp32"))
            if _intact(fp32):  # quantised from it, without torch
                return _quantized(ov.Core().read_model(fp32 / "model.xml"), identity)
        return None
    try:
        return OpenVINOBackbone(_compile(ov.Core().read_model(folder / "model.xml"), identity), identity)
    except (OSError, RuntimeError):
        return None


def save_openvino(net: EagerBackbone, identity: BackboneIdentity) -> OpenVINOBackbone:
    """Convert the fp32 network ``net`` to IR, check it against ``net`` and save it; return it
    compiled for ``identity`` (``net``'s, in any precision).

    Raises ``RuntimeError`` (or the converter's own exception) when the network does not convert
    or the IR does not reproduce it.
    """
    import torch

    differing = {d.field for d in net.identity.differences(identity)}
    if net.identity.precision != "fp32" or differing - {"precision"}:
        raise ValueError("save_openvino converts the fp32 network of the identity it is given")
    size = net.preprocessing.size
    prep = net.preprocessing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the converter's tracing notices
        model = ov.convert_model(
            net.eval(),
            example_input=torch.zeros(1, 3, size, size),
            input=[ov.PartialShape([-1, 3, size, size])],
        )
    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    ppp.input().preprocess().convert_element_type(ov.Type.f32).mean([255 * m for m in prep.mean]).scale(
        [255 * s for s in prep.std]
    )
    model = ppp.build()
    fp32 = OpenVINOBackbone(_compile(model, net.identity, "fp32"), net.identity)
    probe = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    pairs = [(net.embed(probe), fp32.embed(probe))]
    if identity.maps is not None:
        pairs.append((net.embed_maps(probe)[1], fp32.embed_maps(probe)[1]))
    for what, (expected, got) in zip(("embeddings", "maps"), pairs, strict=False):
        cosine = float(cosines(expected, got).min())
        if not cosine >= MIN_COSINE:
            raise RuntimeError(f"the OpenVINO model's {what} are off (cosine {cosine:.7f} < {MIN_COSINE})")
    _write(model, ir_folder(net.identity))
    if identity.precision == "fp32":
        return fp32
    if identity.precision == "int8":
        return _quantized(model, identity)
    return OpenVINOBackbone(_compile(model, identity), identity)


def cosines(expected: np.ndarray, got: np.ndarray) -> np.ndarray:
    """The cosine between each row of ``expected`` and the same row of ``got`` (rows flattened)."""
    expected, got = expected.reshape(len(expected), -1), got.reshape(len(got), -1)
    norms = np.linalg.norm(expected, axis=1) * np.linalg.norm(got, axis=1)
    return np.sum(expected * got, 1) / np.maximum(norms, 1e-30)


def _quantized(model: ov.Model, identity: BackboneIdentity) -> OpenVINOBackbone:
    """The fp32 IR ``model`` quantised to INT8, checked against it on the calibration images and
    saved as ``identity``'s (an ``int8`` one); a :class:`FeatcacheError` when it is too far from fp32."""
    from featcache.backbones.quantize import MIN_MEAN_COSINE, calibration_pixels, quantize_int8

    fp32 = dataclasses.replace(identity, precision="fp32")
    calibration = calibration_pixels(fp32.preprocessing)
    int8 = quantize_int8(model, calibration)
    expected = OpenVINOBackbone(_compile(model, fp32), fp32)
    got = OpenVINOBackbone(_compile(int8, identity), identity)
    batches = [calibration[i : i + 32] for i in range(0, len(calibration), 32)]
    embedded = (np.concatenate([b.embed(x) for x in batches]) for b in (expected, got))
    cosine = float(cosines(*embedded).mean())
    if not cosine >= MIN_MEAN_COSINE:
        raise FeatcacheError(
            f"the INT8 network's embeddings are off (mean cosine {cosine:.4f} < {MIN_MEAN_COSINE})"
        )
    _write(int8, ir_folder(identity))
    return got


def _compile(model: ov.Model, identity: BackboneIdentity, precision: str | None = None) -> ov.CompiledModel:
    hint = _PRECISIONS[precision or identity.precision]
    return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})


def _write(model: ov.Model, folder: Path) -> None:
    """Save ``model`` and the manifest of its files in a scratch folder, then rename that into place
    whole: a reader finds no folder or a complete one. Of two processes saving at once, the first
    rename wins and the second leaves it; a damaged folder in the way is replaced."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        ov.save_model(model, scratch / "model.xml", compress_to_fp16=False)
        manifest = {name: file_sha256(scratch / name) for name in _FILES}
        (scratch / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        for _ in range(2):
            try:
                os.rename(scratch, folder)
                return
            except OSError:  # the folder is there already
                if _intact(folder):
                    return
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _intact(folder: Path) -> bool:
    """Whether ``folder`` holds IR files that match their manifest."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        return all(file_sha256(folder / name) == manifest.get(name) for name in _FILES)
    except (OSError, ValueError, AttributeError):
        return False
