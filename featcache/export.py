"""``export``: a fitted model and its backbone as one self-contained ONNX file.

The graph takes what :func:`featcache.images.load_pixels` produces (an N×H×W×3 uint8 batch at the
model's input size) and returns the class probabilities: normalisation, the backbone with its
layers and pooling, the rounding of the features through the cache's dtype, the linear head with
its scaler folded in, and the softmax. Everything else a user needs (class folders, display
names, categories, preprocessing, the CV report) is in the file's metadata, so the file alone is
enough for ONNX Runtime. The export is checked against ``featcache predict`` before it is kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featcache._version import __version__
from featcache.bundle import DEFAULT_MODEL, ModelBundle, load_bundle
from featcache.errors import FeatcacheError
from featcache.files import replaced_atomically, writable_file

if TYPE_CHECKING:
    from torch import nn

INPUT = "pixels"
OUTPUT = "probabilities"
OOD_OUTPUT = "ood_score"
"""The second output, when the model has an out-of-distribution score: above ``featcache.ood``'s
``threshold`` (metadata) the image is unlike the training images."""
MAX_DIFFERENCE = 1e-4
"""The largest difference allowed between the file's probabilities and ``featcache predict``'s (fp32)."""
MAX_INT8_DIFFERENCE = 0.1
"""An INT8 file's allowance: the mean over the check images of their largest probability difference.
ONNX Runtime's quantised network and OpenVINO's are quantised apart, so an image near a decision
boundary can differ by more (measured: a mean of 0.03 to 0.05, as close as OpenVINO's INT8
predictions are to fp32's)."""
MIN_INT8_AGREEMENT = 0.9
"""The share of the check images whose best class, and whose unknown verdict (ood_score above the
threshold or not), an INT8 file must give as ``featcache predict`` does."""
PRECISIONS = ("fp32", "int8")
OPSET = 17


@dataclass
class ExportResult:
    """What :func:`export` wrote and how closely it agrees with ``featcache predict``: the largest
    absolute difference of any probability over ``n_checked`` images, the share of them whose
    best class agrees, and the largest difference of an ``ood_score`` (None: the model has none);
    ``same_verdict`` is the share whose unknown verdict agrees (None: no ood_score);
    ``mean_difference`` the mean of each image's largest probability difference; ``precision``
    is the network's in the file."""

    path: Path
    max_difference: float
    n_checked: int
    same_label: float
    ood_difference: float | None = None
    precision: str = "fp32"
    same_verdict: float | None = None
    mean_difference: float = 0.0


def metadata(bundle: ModelBundle) -> dict[str, str]:
    """The ONNX metadata of an exported ``bundle``: JSON strings under ``featcache.*`` keys."""
    values = {
        "folders": bundle.folders,
        "names": bundle.names,
        "categories": [bundle.label_map.category(f) for f in bundle.folders],
        "preprocessing": bundle.identity.preprocessing.to_dict(),
        "identity": bundle.identity.to_dict(),
        "feature_dtype": bundle.feature_dtype,
        "report": bundle.card(),
        "input": f"{INPUT}: N x H x W x 3 uint8 RGB at the preprocessing size",
        "version": __version__,
    }
    if bundle.outlier is not None:
        outlier = bundle.outlier
        values["ood"] = {"output": OOD_OUTPUT, "threshold": outlier.threshold, "keep": outlier.keep,
                         "meaning": "unknown (none of the classes) when ood_score > threshold"}  # fmt: skip
    return {f"featcache.{k}": json.dumps(v, default=str) for k, v in values.items()}


def export(
    model_path: str | os.PathLike = DEFAULT_MODEL,
    output: str | os.PathLike = "model.onnx",
    check_pixels: np.ndarray | None = None,
    precision: str | None = None,
) -> ExportResult:
    """Write the model at ``model_path`` (with its backbone) to the ONNX file ``output``.

    ``precision`` is ``fp32`` or ``int8`` (None: ``int8`` for a model fit on INT8 features, else
    ``fp32``; a bf16 model is exported in fp32). An ``int8`` file's network is quantised with NNCF
    on the calibration images of :mod:`featcache.backbones.quantize` (QuantizeLinear and
    DequantizeLinear pairs), its head stays in float. The file is kept only if ONNX Runtime gives
    the probabilities of ``featcache predict`` (in the same precision) on ``check_pixels``
    (default: the demo images that ship with featcache, at the model's input size) within
    :data:`MAX_DIFFERENCE` (int8: within :data:`MAX_INT8_DIFFERENCE`, the same best class for
    :data:`MIN_INT8_AGREEMENT` of them). Raises :class:`FeatcacheError` when the model has no
    linear head or the file does not agree.
    """
    import onnx
    import onnxruntime
    import torch

    from featcache.predictor import Predictor

    bundle = load_bundle(model_path)
    if bundle.head is None:
        raise FeatcacheError(
            f"{model_path}: its pipeline did not reduce to scaling and a linear map when it was fit, "
            "so it cannot be exported; refit it with this featcache"
        )
    precision = precision or ("int8" if bundle.identity.precision == "int8" else "fp32")
    if precision not in PRECISIONS:
        raise FeatcacheError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    output = writable_file(output)
    fp32 = dataclasses.replace(bundle, identity=dataclasses.replace(bundle.identity, precision="fp32"))
    exported = dataclasses.replace(bundle, identity=dataclasses.replace(bundle.identity, precision=precision))
    net = fp32.backbone(device="cpu", engine="torch", traced=False)
    module = _classifier(net, bundle).eval()
    size = bundle.identity.preprocessing.size
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    outputs = [OUTPUT] if bundle.outlier is None else [OUTPUT, OOD_OUTPUT]
    with replaced_atomically(output) as tmp:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the exporter's tracing notices
            torch.onnx.export(
                module, (example,), str(tmp), input_names=[INPUT], output_names=outputs,
                dynamic_axes={name: {0: "batch"} for name in [INPUT, *outputs]}, opset_version=OPSET,
                dynamo=False,
            )  # fmt: skip
        model = onnx.load(str(tmp))
        if precision == "int8":
            from featcache.backbones.quantize import calibration_pixels, quantize_onnx

            model = quantize_onnx(model, calibration_pixels(bundle.identity.preprocessing), INPUT)
        model.doc_string = f"featcache {bundle.family} classifier of {len(bundle.folders)} classes"
        for key, value in metadata(exported).items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(tmp))
        pixels = _check_pixels(bundle) if check_pixels is None else check_pixels
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(outputs, {INPUT: pixels})
        expected, expected_ood = Predictor(exported, device="cpu").score_pixels(pixels)
        per_image = np.abs(got[0] - expected).max(axis=1)
        difference, typical = float(per_image.max()), float(per_image.mean())
        same = float(np.mean(got[0].argmax(axis=1) == expected.argmax(axis=1)))
        ood_difference, same_verdict = None, None
        if expected_ood is not None:
            ood_difference = float(np.abs(got[1] - expected_ood).max())
            threshold = bundle.outlier.threshold
            same_verdict = float(np.mean((got[1] > threshold) == (expected_ood > threshold)))
        result = ExportResult(
            output, difference, len(pixels), same, ood_difference, precision, same_verdict, typical
        )
        _check_agreement(result)
    return result


def _check_agreement(result: ExportResult) -> None:
    """Raise :class:`FeatcacheError` when the file's results are further from predict's than its
    precision allows: fp32 every probability and ood_score within :data:`MAX_DIFFERENCE`; int8 the
    mean of each image's largest probability difference within :data:`MAX_INT8_DIFFERENCE`, and
    the best classes and unknown verdicts as :data:`MIN_INT8_AGREEMENT` says."""
    int8 = result.precision == "int8"
    if int8:
        checks = [("probabilities", result.mean_difference, MAX_INT8_DIFFERENCE)]
    else:
        checks = [("probabilities", result.max_difference, MAX_DIFFERENCE),
                  ("ood_score", result.ood_difference, MAX_DIFFERENCE)]  # fmt: skip
    for what, value, limit in checks:
        if value is not None and not value <= limit:
            raise FeatcacheError(
                f"the exported model's {what} differ from featcache predict's by {value:.2g}"
                f"{' on average' if int8 else ''} (allowed: {limit:.2g}); nothing was written"
            )
    agreements = (("best class", result.same_label), ("unknown verdict", result.same_verdict)) if int8 else ()
    for what, share in agreements:
        if share is not None and not share >= MIN_INT8_AGREEMENT:
            raise FeatcacheError(
                f"the exported model gives featcache predict's {what} for {share:.0%} of the check images "
                f"(at least {MIN_INT8_AGREEMENT:.0%} required); nothing was written"
            )


def _check_pixels(bundle: ModelBundle) -> np.ndarray:
    """The test images of the demo dataset, two of each class, at ``bundle``'s input size."""
    from featcache.demo import DATA
    from featcache.images import load_pixels

    files = [f for folder in sorted((DATA / "test").iterdir()) for f in sorted(folder.iterdir())[:2]]
    return np.stack([load_pixels(f, bundle.identity.preprocessing) for f in files])


def _classifier(net: nn.Module, bundle: ModelBundle) -> nn.Module:
    """uint8 pixels → probabilities: the network and the head of ``bundle`` as one torch module."""
    import torch
    from torch import nn

    prep, head, outlier = bundle.identity.preprocessing, bundle.head, bundle.outlier
    float16 = bundle.feature_dtype == "float16"

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(prep.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(prep.std, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("coef", torch.tensor(head.coef.T * head.beta, dtype=torch.float32))
            self.register_buffer("intercept", torch.tensor(head.intercept * head.beta, dtype=torch.float32))
            if outlier is not None:
                for name in ("mean", "projection", "centers"):
                    array = torch.tensor(getattr(outlier, name), dtype=torch.float32)
                    self.register_buffer(f"ood_{name}", array)

        def forward(self, pixels: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            x = pixels.permute(0, 3, 1, 2).float() / 255.0
            features = self.net((x - self.mean) / self.std)
            if float16:  # the model was fit on features stored as float16
                features = features.half().float()
            proba = (features @ self.coef + self.intercept).softmax(dim=1)
            if outlier is None:
                return proba
            # featcache.outliers.OutlierScore.score
            unit = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
            u = (unit - self.ood_mean) @ self.ood_projection
            d2 = (u[:, None, :] - self.ood_centers[None]).square().sum(dim=2)
            return proba, (d2.min(dim=1).values / self.ood_projection.shape[1]).sqrt()

    return Classifier()
