"""``evaluate``: score a saved model on a feature cache or a labelled image folder.

Working on a cache needs no torch (unless the model is fine-tuned); evaluating an image folder
builds the backbone through :class:`featcache.predictor.Predictor`, the same path as ``predict``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featcache.bundle import DEFAULT_MODEL, ModelBundle, load_bundle
from featcache.cache import read_cache
from featcache.choices import LAYOUT
from featcache.difference import worded
from featcache.errors import FeatcacheError, FeatcacheWarning
from featcache.report import low_recall, low_recall_line, per_class

if TYPE_CHECKING:
    from featcache.predictor import Predictor


@dataclass
class Evaluation:
    """Scores of a model on labelled data, with the prediction for every image scored.

    ``paths[i]`` (relative to the folder or cache root) is of class folder ``truth[i]`` and was
    predicted as ``predicted[i]``; ``skipped`` lists the images that could not be read.
    ``unknown[i]`` says whether the image's out-of-distribution score is above the model's
    threshold (None when the model has no such score); the model abstains on those, and
    ``coverage`` and ``covered_accuracy`` are its share of images answered and its accuracy on
    them. ``low_recall`` lists the classes it recognises in under 10 % of their images.
    """

    accuracy: float
    macro_f1: float
    per_class: list[dict[str, Any]]
    confusion: np.ndarray
    folders: list[str]
    paths: list[str]
    truth: list[str]
    predicted: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unknown: list[bool] | None = None
    low_recall: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return len(self.paths)

    @property
    def coverage(self) -> float | None:
        """The share of images the model answers (not unknown), or None without an outlier score."""
        return None if self.unknown is None else 1 - float(np.mean(self.unknown))

    @property
    def covered_accuracy(self) -> float | None:
        """The accuracy on the images the model answers (None without an outlier score, or none answered)."""
        if self.unknown is None or all(self.unknown):
            return None
        kept = [t == p for t, p, u in zip(self.truth, self.predicted, self.unknown, strict=True) if not u]
        return float(np.mean(kept))


def evaluate(
    source: str | os.PathLike,
    model_path: str | os.PathLike = DEFAULT_MODEL,
    batch_size: int = 32,
    workers: int = 2,
    device: str = "auto",
    engine: str = "auto",
    precision: str | None = None,
) -> Evaluation:
    """Score the model at ``model_path`` on a feature cache or on a labelled image folder.

    A cache must have been made with the model's backbone identity; a folder's images are
    classified exactly as ``predict`` classifies them (nothing is written), their backbone in
    ``precision`` (None: the model's).
    """
    source = Path(source)
    if not source.exists():
        raise FeatcacheError(f"{source}: no such feature cache or image folder")
    bundle = load_bundle(model_path)
    if source.is_dir():
        from featcache.predictor import Predictor

        predictor = Predictor(bundle, device=device, engine=engine, batch_size=batch_size, workers=workers,
                              precision=precision)  # fmt: skip
        paths, truth, predicted, unknown, skipped = _predict_folder(predictor, source)
    else:
        from featcache.families import FAMILIES

        cache = read_cache(source)
        differences = cache.identity.differences(bundle.fit_identity)
        if differences:
            raise FeatcacheError(
                f"{source} was extracted differently from the features {model_path} was fit on "
                f"({worded(differences)}): re-extract with the model's backbone, "
                "or evaluate an image folder"
            )
        X, y, _ = FAMILIES[bundle.family].inputs(cache)
        paths = [p for p, label in zip(cache.paths, cache.labels, strict=True) if label >= 0]
        predicted, truth, skipped = bundle.predict_cached(X), y.tolist(), cache.skipped
        scores = bundle.ood_score(X) if bundle.fit_identity == bundle.identity else None
        unknown = None if scores is None else (scores > bundle.outlier.threshold).tolist()
    if not paths:
        raise FeatcacheError(f"{source}: no labelled images to evaluate: {LAYOUT}")
    foreign = sorted(set(truth) - set(bundle.folders))
    if foreign:
        raise FeatcacheError(
            f"{source}: class folder(s) the model does not know: {', '.join(foreign[:10])} "
            f"(model classes: {', '.join(bundle.folders[:10])}{'…' if len(bundle.folders) > 10 else ''})"
        )
    evaluation = _score(bundle, paths, truth, predicted, skipped)
    evaluation.unknown = unknown
    for row in evaluation.low_recall:
        warnings.warn(low_recall_line(row, f"on {source}"), FeatcacheWarning, stacklevel=2)
    return evaluation


def _predict_folder(
    predictor: Predictor, folder: Path
) -> tuple[list[str], list[str], list[str], list[bool] | None, list[tuple[str, str]]]:
    """Classify the labelled images of ``folder`` with ``predictor``, as ``predict`` would."""
    from featcache.dataset import scan

    dataset = scan(folder)
    files = [f for f in dataset.files if f.label >= 0]
    paths, truth, predicted, unknown = [], [], [], []
    skipped = list(dataset.unreadable)
    results = predictor.predict_files([dataset.path(f.relpath) for f in files])
    for f, p in zip(files, results, strict=True):
        if p.error is not None:
            skipped.append((f.relpath, p.error))
            continue
        paths.append(f.relpath)
        truth.append(dataset.folders[f.label])
        predicted.append(p.folder)
        unknown.append(p.unknown)
    has_score = predictor.bundle.outlier is not None
    return (
        paths,
        truth,
        predicted,
        unknown if has_score else None,
        sorted(skipped, key=lambda s: os.fsencode(s[0])),
    )


def _score(
    bundle: ModelBundle, paths: list[str], truth: list[str], predicted: list[str], skipped: list
) -> Evaluation:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    y, pred = np.array(truth), np.array(predicted)
    rows = per_class(y, pred, bundle.folders, bundle.label_map)
    confusion = confusion_matrix(y, pred, labels=bundle.folders)
    return Evaluation(
        accuracy=float(accuracy_score(y, pred)),
        macro_f1=float(f1_score(y, pred, labels=sorted(set(truth)), average="macro", zero_division=0)),
        per_class=rows,
        confusion=confusion,
        folders=bundle.folders,
        paths=paths,
        truth=truth,
        predicted=predicted,
        skipped=skipped,
        low_recall=low_recall(rows, confusion, bundle.label_map),
    )
