"""``fit`` and ``evaluate``: cross-validate model families on a feature cache, keep the best, score it."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from featcache import __version__
from featcache.backbones import BackboneIdentity
from featcache.bundle import load_bundle, save_bundle
from featcache.cache import FeatureCache, read_cache
from featcache.dataset import LabelMap
from featcache.errors import FeatcacheError
from featcache.models import FAMILIES, linear_head

MODEL_CHOICES = (*FAMILIES, "all")


@dataclass
class FitResult:
    """What :func:`fit` did: the report (also saved as JSON) and where the files are."""

    report: dict[str, Any]
    model_path: Path
    report_path: Path
    confusion_path: Path


def _labelled(cache: FeatureCache) -> tuple[np.ndarray, np.ndarray]:
    mask = cache.labels >= 0
    names = np.array(cache.classes, dtype=object)
    return cache.features[mask].astype(np.float32), names[cache.labels[mask]].astype(str)


def fit(
    features: str | os.PathLike = "features.h5",
    model: str = "all",
    cv: int = 5,
    output: str | os.PathLike = "models",
    seed: int = 0,
    on_progress: Callable[[str], None] | None = None,
) -> FitResult:
    """Cross-validate ``model`` (a family or ``all``) on ``features``; save the best in ``output``.

    Each family's small grid is scored by stratified ``cv``-fold cross-validation (seeded); the
    family with the best mean accuracy is refit on all labelled rows. Its out-of-fold
    predictions give the per-class table and the confusion matrix.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
    from sklearn.model_selection import ParameterGrid, StratifiedKFold, cross_validate

    if model not in MODEL_CHOICES:
        raise FeatcacheError(f"model must be one of {', '.join(MODEL_CHOICES)}, got {model!r}")
    if not isinstance(cv, int) or cv < 2:
        raise FeatcacheError(f"--cv must be an integer >= 2, got {cv!r}")
    cache = read_cache(features)
    X, y = _labelled(cache)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise FeatcacheError(f"{features}: need labelled images of at least 2 classes, found {len(classes)}")
    small = [f"{c} ({n})" for c, n in zip(classes, counts, strict=True) if n < cv]
    if small:
        raise FeatcacheError(
            f"{len(small)} class(es) have fewer images than --cv {cv} folds: {', '.join(small[:10])}; "
            "add images, lower --cv, or remove those classes"
        )
    folds = list(StratifiedKFold(cv, shuffle=True, random_state=seed).split(X, y))
    families = list(FAMILIES) if model == "all" else [model]
    results: dict[str, Any] = {}
    oof: dict[str, np.ndarray] = {}
    for name in families:
        family = FAMILIES[name]
        if on_progress:
            on_progress(f"{name}: {len(ParameterGrid(family.grid))} settings x {cv} folds")
        start = time.perf_counter()
        grid = []
        for params in ParameterGrid(family.grid):
            pipe = family.build(seed).set_params(**params)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence chatter of the solvers
                cvr = cross_validate(pipe, X, y, cv=folds, return_estimator=True, return_indices=True)
            pred = np.empty(len(y), dtype=y.dtype)
            for est, test in zip(cvr["estimator"], cvr["indices"]["test"], strict=True):
                pred[test] = est.predict(X[test])
            accs = [accuracy_score(y[t], pred[t]) for _, t in folds]
            f1s = [f1_score(y[t], pred[t], average="macro") for _, t in folds]
            grid.append({"params": params, "cv_accuracy_mean": float(np.mean(accs)),
                         "cv_accuracy_std": float(np.std(accs)), "cv_f1_macro_mean": float(np.mean(f1s)),
                         "_pred": pred})  # fmt: skip
        best = max(grid, key=lambda g: g["cv_accuracy_mean"])
        oof[name] = best.pop("_pred")
        for g in grid:
            g.pop("_pred", None)
        summary = {k: v for k, v in best.items() if k != "params"}
        results[name] = {**summary, "best_params": best["params"], "fit_seconds": time.perf_counter() - start,
                         "grid": grid}  # fmt: skip
    chosen = max(families, key=lambda n: results[n]["cv_accuracy_mean"])
    if on_progress:
        on_progress(f"refitting {chosen} on all {len(y)} images")
    final = FAMILIES[chosen].build_final(seed, results[chosen]["best_params"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final.fit(X, y)
    pred = oof[chosen]
    per_class = _per_class(y, pred, list(classes), cache.label_map)
    report = {
        "best": chosen,
        "cv": cv,
        "seed": seed,
        "n_images": int(len(y)),
        "n_classes": int(len(classes)),
        "families": results,
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y, pred, labels=classes).tolist(),
        "classes": classes.tolist(),
        "features": str(Path(features).resolve()),
    }
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    head = linear_head(final, X)
    bundle = {
        "pipeline": final,
        "head": head.to_dict() if head is not None else None,
        "family": chosen,
        "classes": classes.tolist(),
        "label_map": cache.label_map.to_dict(),
        "identity": cache.identity.to_dict(),
        "feature_dtype": cache.dtype,
        "report": report,
        "featcache_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    from featcache.report import save_confusion_png, save_json

    model_path = out / "best.joblib"
    save_bundle(bundle, model_path)
    report_path = save_json(report, out / "report.json")
    confusion_path = save_confusion_png(
        np.array(report["confusion_matrix"]),
        [cache.label_map.display(c) for c in classes],
        out / "confusion_matrix.png",
        title=f"{chosen}: out-of-fold predictions ({cv}-fold CV, {len(y)} images)",
    )
    return FitResult(report, model_path, report_path, confusion_path)


def _per_class(
    y: np.ndarray, pred: np.ndarray, classes: list[str], label_map: LabelMap
) -> list[dict[str, Any]]:
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(y, pred, labels=classes, zero_division=0)
    return [
        {"class": c, "name": label_map.display(c), "precision": float(p[i]), "recall": float(r[i]),
         "f1": float(f[i]), "support": int(s[i])}
        for i, c in enumerate(classes)
    ]  # fmt: skip


@dataclass
class Evaluation:
    """Scores of a model on labelled data."""

    accuracy: float
    macro_f1: float
    per_class: list[dict[str, Any]]
    confusion: np.ndarray
    classes: list[str]
    n_images: int
    skipped: list[tuple[str, str]]


def model_identity(bundle: dict[str, Any]) -> BackboneIdentity:
    """The backbone identity a bundle was fit on."""
    return BackboneIdentity.from_dict(bundle["identity"])


def evaluate(
    source: str | os.PathLike,
    model_path: str | os.PathLike = "models/best.joblib",
    batch_size: int = 32,
    workers: int = 2,
    device: str = "auto",
) -> Evaluation:
    """Score the model at ``model_path`` on a feature cache or on a labelled image folder.

    A cache must have been made with the model's backbone identity; a folder is embedded on the
    fly with that backbone (nothing is written).
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    bundle = load_bundle(model_path)
    identity = model_identity(bundle)
    label_map = LabelMap.from_dict(bundle["label_map"])
    source = Path(source)
    if source.is_dir():
        from featcache.extract import embed_folder

        cache = embed_folder(source, identity, batch_size=batch_size, workers=workers, device=device)
    else:
        cache = read_cache(source)
        differences = cache.identity.differences(identity)
        if differences:
            raise FeatcacheError(
                f"{source} was extracted differently from the features {model_path} was fit on "
                f"({'; '.join(differences)}): re-extract with the model's backbone, "
                "or evaluate an image folder"
            )
    X, y = _labelled(cache)
    if len(y) == 0:
        raise FeatcacheError(f"{source}: no labelled images to evaluate")
    known = set(bundle["classes"])
    unknown = sorted(set(y) - known)
    if unknown:
        raise FeatcacheError(
            f"{source}: class folder(s) the model does not know: {', '.join(unknown[:10])} "
            f"(model classes: {', '.join(bundle['classes'][:10])}{'…' if len(known) > 10 else ''})"
        )
    pred = bundle["pipeline"].predict(X)
    classes = list(bundle["classes"])
    per_class = _per_class(y, pred, classes, label_map)
    return Evaluation(
        accuracy=float(accuracy_score(y, pred)),
        macro_f1=float(f1_score(y, pred, labels=sorted(set(y)), average="macro", zero_division=0)),
        per_class=per_class,
        confusion=confusion_matrix(y, pred, labels=classes),
        classes=classes,
        n_images=int(len(y)),
        skipped=cache.skipped,
    )
