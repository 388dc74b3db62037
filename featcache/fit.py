"""``fit``: cross-validate model families on a feature cache and keep the best. It needs no torch
unless the chosen family does (``finetune``)."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featcache.bundle import MODEL_FILE, save_bundle
from featcache.cache import read_cache
from featcache.choices import LAYOUT, MODELS
from featcache.errors import FeatcacheError
from featcache.evaluate import Evaluation, evaluate  # noqa: F401 - where scripts found them before
from featcache.files import locked, writable_folder

if TYPE_CHECKING:
    from featcache.models import Family


@dataclass
class FitResult:
    """What :func:`fit` did: the report (also saved as JSON) and where the files are."""

    report: dict[str, Any]
    model_path: Path
    report_path: Path
    confusion_path: Path


@contextmanager
def _convergence_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Collect scikit-learn's ConvergenceWarnings raised in the block (they are counted in the
    report); every other warning is passed on as it was raised."""
    from sklearn.exceptions import ConvergenceWarning

    found: list[warnings.WarningMessage] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield found
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            found.append(w)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def fit(
    features: str | os.PathLike = "features.h5",
    model: str = "all",
    cv: int = 5,
    output: str | os.PathLike = "models",
    seed: int = 0,
    on_progress: Callable[[str], None] | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
) -> FitResult:
    """Cross-validate ``model`` (a family or ``all``) on ``features``; save the best in ``output``.

    Each family's small grid is scored by stratified ``cv``-fold cross-validation (seeded); the
    family with the best mean accuracy is refit on all labelled rows. Its out-of-fold
    predictions give the per-class table and the confusion matrix. Fits whose solver stopped
    before converging are counted in the report. ``all`` tries every family that can fit the
    cache (``finetune`` when it keeps feature maps); ``on_epoch(done, total)`` follows the epochs
    of the families that train in epochs. The model is saved only once it is complete: a fit
    stopped at any point leaves the previous model in ``output`` as it was, and another ``fit``
    writing ``output`` meanwhile is an error naming it.
    """
    from sklearn.metrics import confusion_matrix
    from sklearn.model_selection import ParameterGrid, StratifiedKFold
    from threadpoolctl import threadpool_limits

    from featcache.families import FAMILIES

    if model not in MODELS:
        raise FeatcacheError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    if not isinstance(cv, int) or cv < 2:
        raise FeatcacheError(f"cv must be an integer >= 2, got {cv!r}")
    started = time.perf_counter()
    cache = read_cache(features)
    if model != "all" and (why := FAMILIES[model].unavailable(cache)):
        raise FeatcacheError(why)
    out = writable_folder(output)
    with locked(out / MODEL_FILE, "fit"):  # another fit into this folder is refused
        y = cache.labelled()[1]
        folders, counts = np.unique(y, return_counts=True)
        if len(folders) < 2:
            raise FeatcacheError(
                f"{features}: need labelled images of at least 2 classes, found {len(folders)}: {LAYOUT}"
            )
        small = [f"{c} ({n})" for c, n in zip(folders, counts, strict=True) if n < cv]
        if small:
            raise FeatcacheError(
                f"{len(small)} class(es) have fewer images than the {cv} folds (cv={cv}): "
                f"{', '.join(small[:10])}; add images, lower cv={cv}, or remove those classes"
            )
        folds = list(StratifiedKFold(cv, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
        names = [n for n in FAMILIES if not FAMILIES[n].unavailable(cache)] if model == "all" else [model]
        families = [FAMILIES[n] for n in names]
        epochs = EpochCounter(on_epoch, sum(len(ParameterGrid(f.grid)) * cv * f.epochs for f in families))
        epochs.total += max(f.epochs for f in families)  # the refit, when the chosen family trains in epochs
        results: dict[str, Any] = {}
        oof: dict[str, np.ndarray] = {}
        inputs: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
        for family in families:
            if on_progress:
                on_progress(f"{family.name}: {len(ParameterGrid(family.grid))} settings x {cv} folds")
            X, _, fixed = family.inputs(cache)
            inputs[family.name] = X, fixed
            results[family.name], oof[family.name] = cross_validate_family(
                family.name, X, y, folds, seed, fixed, on_epoch=epochs.fit_params(family)
            )
        chosen = max(names, key=lambda n: results[n]["cv_accuracy_mean"])
        if on_progress:
            on_progress(f"refitting {chosen} on all {len(y)} images")
        family = FAMILIES[chosen]
        X, fixed = inputs[chosen]
        refit_start = time.perf_counter()
        final = family.build_final(seed, {**results[chosen]["best_params"], **fixed})
        with _convergence_warnings() as unconverged, threadpool_limits(family.blas_threads, "blas"):
            final.fit(X, y, **epochs.fit_params(family))
        epochs.finish()
        from featcache.report import per_class, save_confusion_png, save_json

        pred = oof[chosen]
        report = {
            "best": chosen,
            "cv": cv,
            "seed": seed,
            "n_images": int(len(y)),
            "n_classes": int(len(folders)),
            "families": results,
            "refit_converged": not unconverged,
            "per_class": per_class(y, pred, list(folders), cache.label_map),
            "confusion_matrix": confusion_matrix(y, pred, labels=folders).tolist(),
            "folders": folders.tolist(),
            "features": str(Path(features).resolve()),
            "engine": cache.engine,
        }
        bundle = family.to_bundle(final, cache, X, report)
        family.prepare(bundle)
        report["refit_seconds"] = time.perf_counter() - refit_start
        report["seconds"] = time.perf_counter() - started

        model_path = out / MODEL_FILE
        save_bundle(bundle, model_path)
        report_path = save_json(report, out / "report.json")
        confusion_path = save_confusion_png(
            np.array(report["confusion_matrix"]),
            bundle.names,
            out / "confusion_matrix.png",
            title=f"{chosen}: out-of-fold predictions ({cv}-fold CV, {len(y)} images)",
        )
        return FitResult(report, model_path, report_path, confusion_path)


def cross_validate_family(
    name: str,
    X: np.ndarray,
    y: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]],
    seed: int = 0,
    fixed: dict[str, Any] | None = None,
    on_epoch: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Score every setting of family ``name``'s grid on ``folds``; return its report entry (the best
    setting's mean and std accuracy, macro F1, every setting's scores, fit time, unconverged fits)
    and the best setting's out-of-fold predictions. ``fixed`` parameters are set on every
    pipeline and not reported (what :meth:`~featcache.models.Family.inputs` fixes); ``on_epoch``
    are the fit parameters that follow a fit's epochs."""
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import ParameterGrid, cross_validate
    from threadpoolctl import threadpool_limits

    from featcache.families import FAMILIES

    family = FAMILIES[name]
    start = time.perf_counter()
    grid = []
    for params in ParameterGrid(family.grid):
        pipe = family.build(seed).set_params(**params, **(fixed or {}))
        with _convergence_warnings() as unconverged, threadpool_limits(family.blas_threads, "blas"):
            cvr = cross_validate(pipe, X, y, cv=folds, return_estimator=True, return_indices=True,
                                 params=on_epoch or {})  # fmt: skip
        pred = np.empty(len(y), dtype=y.dtype)
        for est, test in zip(cvr["estimator"], cvr["indices"]["test"], strict=True):
            pred[test] = est.predict(X[test])
        accs = [accuracy_score(y[t], pred[t]) for _, t in folds]
        f1s = [f1_score(y[t], pred[t], average="macro") for _, t in folds]
        grid.append({"params": params, "cv_accuracy_mean": float(np.mean(accs)),
                     "cv_accuracy_std": float(np.std(accs)), "cv_f1_macro_mean": float(np.mean(f1s)),
                     "not_converged": min(len(unconverged), len(folds)), "_pred": pred})  # fmt: skip
    best = max(grid, key=lambda g: g["cv_accuracy_mean"])
    best_pred = best.pop("_pred")
    for g in grid:
        g.pop("_pred", None)
    summary = {k: v for k, v in best.items() if k not in ("params", "not_converged")}
    report = {**summary, "best_params": best["params"], "fit_seconds": time.perf_counter() - start,
              "fits": len(grid) * len(folds), "not_converged": sum(g["not_converged"] for g in grid),
              "grid": grid}  # fmt: skip
    return report, best_pred


class EpochCounter:
    """Turns the epochs of the families that train in epochs into ``on_epoch(done, total)`` over the
    whole fit: every setting and fold, and the refit."""

    def __init__(self, on_epoch: Callable[[int, int], None] | None, total: int):
        self.on_epoch, self.done, self.total = on_epoch, 0, total

    def _advance(self, n: int) -> None:
        self.done += n
        if self.on_epoch is not None:
            self.on_epoch(self.done, self.total)

    def fit_params(self, family: Family) -> dict[str, Any]:
        """The fit parameters that report the epochs of ``family``'s fits here (none for a family that
        does not train in epochs)."""
        return {"clf__on_epoch": self._advance} if family.epochs and self.on_epoch is not None else {}

    def finish(self) -> None:
        """Count the epochs that will not run (the refit of a family that does not train in epochs)."""
        if self.on_epoch is not None and self.total and self.done < self.total:
            self._advance(self.total - self.done)
