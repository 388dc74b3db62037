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
OPSET = 17


@dataclass
class ExportResult:
    """What :func:`export` wrote and how closely it agrees with ``featcache predict``: the largest
    absolute difference of any probability over ``n_checked`` images, the share of them whose
    best class agrees, and the largest difference of an ``ood_score`` (None: the model has none)."""

    path: Path
    max_difference: float
    n_checked: int
    same_label: float
    ood_difference: float | None = None


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
) -> ExportResult:
    """Write the model at ``model_path`` (with its backbone) to the ONNX file ``output``.

    The file is kept only if ONNX Runtime gives the probabilities of ``featcache predict`` on
    ``check_pixels`` (default: the demo images that ship with featcache, at the model's input
    size) within :data:`MAX_DIFFERENCE` (fp32 models; bf16 ones are exported in fp32 and checked
    against an fp32 predictor). Raises :class:`FeatcacheError` when the model has no linear head
    or the file does not agree.
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
    output = writable_file(output)
    fp32 = dataclasses.replace(bundle, identity=dataclasses.replace(bundle.identity, precision="fp32"))
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
        model.doc_string = f"featcache {bundle.family} classifier of {len(bundle.folders)} classes"
        for key, value in metadata(bundle).items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(tmp))
        pixels = _check_pixels(bundle) if check_pixels is None else check_pixels
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(outputs, {INPUT: pixels})
        expected, expected_ood = Predictor(fp32, device="cpu").score_pixels(pixels)
        difference = float(np.abs(got[0] - expected).max())
        same = float(np.mean(got[0].argmax(axis=1) == expected.argmax(axis=1)))
        ood_difference = None if expected_ood is None else float(np.abs(got[1] - expected_ood).max())
        for what, value in (("probabilities", difference), ("ood_score", ood_difference)):
            if value is not None and not value <= MAX_DIFFERENCE:
                raise FeatcacheError(
                    f"the exported model's {what} differ from featcache predict's by {value:.2g} "
                    f"(allowed: {MAX_DIFFERENCE:g}); nothing was written"
                )
    return ExportResult(output, difference, len(pixels), same, ood_difference)


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
