"""INT8 post-training quantisation of an OpenVINO network with NNCF.

NNCF measures the range of every activation on calibration images and inserts quantise nodes;
the calibration images are cut from the photographs in ``featcache/calibration_data`` (public
domain and CC0, colour) by a seeded generator, and half of them are turned grey, so the INT8
network depends only on the fp32 one and the versions: every machine, Dask worker and model
bundle gets the same one. Importing NNCF imports torch when it is installed; running the result
needs OpenVINO only.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import openvino as ov
from PIL import Image

from featcache.images import resize
from featcache.preprocessing import Preprocessing

if TYPE_CHECKING:
    import onnx

CALIBRATION_IMAGES = 300
"""How many images calibrate the quantisation (NNCF's default subset size)."""
MIN_MEAN_COSINE = 0.95
"""How close the INT8 network's embeddings of the calibration images must be to fp32's (their
mean cosine) for it to be kept; Lite0 reaches 0.973."""
PHOTOS = Path(__file__).resolve().parent.parent / "calibration_data"


def calibration_pixels(prep: Preprocessing, n: int = CALIBRATION_IMAGES) -> np.ndarray:
    """``n`` network-ready N×H×W×3 uint8 images: square crops of the calibration photographs
    (a quarter to all of the short side, some mirrored), every other one grey."""
    photos = [Image.open(path).convert("RGB") for path in sorted(PHOTOS.glob("*.jpg"))]
    if not photos:
        raise FileNotFoundError(f"no calibration photographs in {PHOTOS}")
    rng = np.random.default_rng(0)
    out = np.empty((n, prep.size, prep.size, 3), dtype=np.uint8)
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = int(rng.integers(min(w, h) // 4, min(w, h) + 1))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if i % 2:
            crop = crop.convert("L").convert("RGB")
        out[i] = resize(crop, prep)
    return out


def quantize_int8(model: ov.Model, calibration: np.ndarray) -> ov.Model:
    """``model`` (uint8 NHWC pixels in) with its weights and activations quantised to INT8,
    calibrated on ``calibration`` (from :func:`calibration_pixels`)."""
    return _quantize(model, [calibration[i : i + 1] for i in range(len(calibration))])


def quantize_onnx(model: onnx.ModelProto, calibration: np.ndarray, input_name: str) -> onnx.ModelProto:
    """The ONNX classifier ``model`` (uint8 NHWC pixels in) with its network quantised to INT8 as
    QuantizeLinear/DequantizeLinear pairs, calibrated on ``calibration``; its matrix products (the
    linear head, the out-of-distribution projection) stay in float."""
    import nncf

    items = [{input_name: calibration[i : i + 1]} for i in range(len(calibration))]
    return _quantize(model, items, ignored_scope=nncf.IgnoredScope(types=["MatMul"], validate=False))


def _quantize(model, items: list, **options):
    """NNCF's quantisation of ``model`` on the calibration ``items``, its progress bars and log lines
    kept off the caller's terminal."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" on import
    import nncf

    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), **options)

