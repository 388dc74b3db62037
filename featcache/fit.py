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
from threadpoolctl import threadpool_limits

from featcache import outliers
from featcache.bundle import MODEL_FILE, save_bundle
from featcache.cache import FeatureCache, read_cache
from featcache.calibration import calibrated
from featcache.choices import CLASS_WEIGHTS, IMBALANCE, LAYOUT, MODELS, SELECT_BY
from featcache.duplicates import near_duplicate_groups
from featcache.errors import FeatcacheError, FeatcacheWarning
from featcache.evaluate import Evaluation, evaluate  # noqa: F401 - where scripts found them before
from featcache.files import locked, writable_folder
from featcache.oof import OOF_FILE, save_oof

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


@dataclass(frozen=True)
class Selection:
    """How ``fit`` cross-validates and chooses: which class weightings it tries (``class_weight``:
    ``auto``, ``none`` or ``balanced``), the out-of-fold metric that chooses settings and families
    (``select_by``: ``balanced_accuracy``, ``accuracy`` or ``macro_f1``), whether near-duplicate
    images are kept in one fold (``group_duplicates``), and where the cross-validation fits run
    (``scheduler``: None for this process, or ``local``, ``local:N``, ``tcp://HOST:PORT`` for a
    Dask cluster; the result is the same)."""

    class_weight: str = "auto"
    select_by: str = SELECT_BY[0]
    group_duplicates: bool = True
    scheduler: str | None = None

    def check(self) -> None:
        """A :class:`FeatcacheError` naming the first setting that is not allowed."""
        for name, value, allowed in (("class_weight", self.class_weight, CLASS_WEIGHTS),
                                     ("select_by", self.select_by, SELECT_BY)):  # fmt: skip
            if value not in allowed:
                raise FeatcacheError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not isinstance(self.group_duplicates, bool):
            raise FeatcacheError(f"group_duplicates must be True or False, got {self.group_duplicates!r}")
        if self.scheduler is not None:
            from featcache.distributed import workers_to_start

            workers_to_start(self.scheduler)

    def weightings(self, counts: np.ndarray) -> tuple[str | None, ...]:
        """The class weightings to try on classes of ``counts`` images."""
        if self.class_weight == "auto":
            return (None, "balanced") if counts.max() >= IMBALANCE * counts.min() else (None,)
        return (None,) if self.class_weight == "none" else ("balanced",)


COMPARE_GROUPING = 0.01
"""``fit`` cross-validates the chosen setting again with near-duplicates split across folds, to
report what grouping them changed, when grouping joined at least this share of the images."""

METRICS = {"accuracy": "cv_accuracy_mean", "balanced_accuracy": "cv_balanced_accuracy_mean",
           "macro_f1": "cv_f1_macro_mean"}  # fmt: skip
"""The report key of each ``select_by`` metric."""


@dataclass(frozen=True)
class CVPlan:
    """What every family is cross-validated on: the folds, the seed of the models, the metric that
    chooses a setting (a key of :data:`METRICS`), the class weightings added to each grid, and
    the Dask cluster that runs the fits (None: this process)."""

    folds: list[tuple[np.ndarray, np.ndarray]]
    seed: int = 0
    select_by: str = SELECT_BY[0]
    weightings: tuple[str | None, ...] = (None,)
    scheduler: str | None = None


@dataclass
class OutOfFold:
    """The chosen setting's out-of-fold results, one row per labelled image: logits (N×K, the
    softmax of which is the uncalibrated probability) and predicted class folders."""

    logits: np.ndarray
    predicted: np.ndarray


def fit(
    features: str | os.PathLike | FeatureCache = "features.h5",
    model: str = "all",
    cv: int = 5,
    output: str | os.PathLike = "models",
    seed: int = 0,
    selection: Selection | None = None,
    on_progress: Callable[[str], None] | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
) -> FitResult:
    """Cross-validate ``model`` (a family or ``all``) on ``features``; save the best in ``output``.

    Each family's small grid (with class weights, see :class:`Selection`) is scored by stratified
    ``cv``-fold cross-validation (seeded; near-duplicate images kept within one fold); the setting
    and family with the best out-of-fold ``selection.select_by`` are refit on all labelled rows.
    Its out-of-fold predictions give the per-class table, the confusion matrix, the calibration
    (a temperature is learnt on them when the expected calibration error is above 0.05, and
    always for margin classifiers), and the threshold of the out-of-distribution score saved
    with the model; they are kept in ``output/oof.npz``. A class recognised in under 10 % of its
    images out of fold is a :class:`FeatcacheWarning`. Fits whose solver stopped before
    converging are counted in the report. ``all`` tries every family that can fit the cache
    (``finetune`` when it keeps feature maps); ``on_epoch(done, total)`` follows the epochs of
    the families that train in epochs. The model is saved only once it is complete: a fit
    stopped at any point leaves the previous model in ``output`` as it was, and another ``fit``
    writing ``output`` meanwhile is an error naming it. ``features`` is a cache file, or a
    cache read into memory (e.g. with labels corrected by :mod:`featcache.corrections`, which
    the report then records).
    """
    from sklearn.model_selection import ParameterGrid

    from featcache.families import FAMILIES

    selection = selection or Selection()
    if model not in MODELS:
        raise FeatcacheError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    if not isinstance(cv, int) or cv < 2:
        raise FeatcacheError(f"cv must be an integer >= 2, got {cv!r}")
    selection.check()
    started = time.perf_counter()
    cache = features if isinstance(features, FeatureCache) else read_cache(features)
    features = cache.path or "(a cache in memory)"
    if model != "all" and (why := FAMILIES[model].unavailable(cache)):
        raise FeatcacheError(why)
    out = writable_folder(output)
    from featcache.crossval import cluster

    # another fit into this folder is refused; the cluster (when asked for) starts once
    with locked(out / MODEL_FILE, "fit"), cluster(selection.scheduler):
        pooled, y = cache.labelled()
        folders, y_idx, counts = np.unique(y, return_inverse=True, return_counts=True)
        _check_classes(features, folders, counts, cv)
        groups = near_duplicate_groups(pooled) if selection.group_duplicates else None
        plan = CVPlan(_folds(y, groups, cv, seed), seed, selection.select_by, selection.weightings(counts),
                      selection.scheduler)  # fmt: skip
        _check_folds(plan.folds, y_idx, folders, groups)
        names = [n for n in FAMILIES if not FAMILIES[n].unavailable(cache)] if model == "all" else [model]
        families = [FAMILIES[n] for n in names]
        per_fit = {f.name: _fits(f, plan) * cv * f.epochs for f in families}
        epochs = EpochCounter(on_epoch, sum(per_fit.values()) + max(f.epochs for f in families))
        results: dict[str, Any] = {}
        oof: dict[str, OutOfFold] = {}
        inputs: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
        for family in families:
            if on_progress:
                on_progress(f"{family.name}: {len(ParameterGrid(_grid(family, plan)))} settings x {cv} folds")
            X, _, fixed = family.inputs(cache)
            inputs[family.name] = X, fixed
            results[family.name], oof[family.name] = cross_validate_family(
                family.name, X, y, plan, fixed, on_epoch=epochs.fit_params(family)
            )
        chosen = max(names, key=lambda n: results[n][METRICS[selection.select_by]])
        family = FAMILIES[chosen]
        X, fixed = inputs[chosen]
        report = _oof_report(results[chosen], oof[chosen], y, folders, cache)
        beta, report["calibration"] = _calibration(oof[chosen].logits, y_idx, family.calibrate)
        ungrouped = None
        joined = 0 if groups is None else len(y) - len(np.unique(groups))
        if joined >= COMPARE_GROUPING * len(y):  # fewer: a difference would be the folds' noise
            if on_progress:
                on_progress(f"{chosen}: cross-validating again without grouping near-duplicates")
            plain = CVPlan(_folds(y, None, cv, seed), seed, selection.select_by, (None,), selection.scheduler)
            params = {k: [v] for k, v in results[chosen]["best_params"].items()}
            ungrouped = _cross_validate_grid(family, X, y, plain, params, fixed)[0]
        report["duplicates"] = _duplicates_report(groups, results[chosen], ungrouped, selection.select_by)
        outlier, oof_scores = None, None
        if family.scores_outliers:
            if on_progress:
                on_progress("out-of-distribution score: fitting it out of fold")
            outlier, oof_scores = outliers.out_of_fold(pooled, y_idx, plan.folds)
            report["outliers"] = {"threshold": outlier.threshold, "keep": outlier.keep,
                                  "components": int(outlier.projection.shape[1])}  # fmt: skip
        if on_progress:
            on_progress(f"refitting {chosen} on all {len(y)} images")
        refit_start = time.perf_counter()
        final = family.build_final(seed, {**results[chosen]["best_params"], **fixed}, beta)
        with _convergence_warnings() as unconverged, threadpool_limits(family.blas_threads, "blas"):
            final.fit(X, y, **epochs.fit_params(family))
        epochs.finish()
        report = {"best": chosen, "cv": cv, "seed": seed, "select_by": selection.select_by,
                  "class_weight": selection.class_weight, "n_images": int(len(y)),
                  "n_classes": int(len(folders)), "families": results,
                  "refit_converged": not unconverged, **report,
                  "features": str(Path(features).resolve()), "engine": cache.engine}  # fmt: skip
        report.update(cache.changes)
        bundle = family.to_bundle(final, cache, X, report)
        bundle.outlier = outlier
        family.prepare(bundle)
        report["refit_seconds"] = time.perf_counter() - refit_start
        report["seconds"] = time.perf_counter() - started
        _warn_low_recall(report["low_recall"], "out of fold")

        from featcache.report import save_confusion_png, save_json

        model_path = out / MODEL_FILE
        save_bundle(bundle, model_path)
        report_path = save_json(report, out / "report.json")
        labelled = [p for p, label in zip(cache.paths, cache.labels, strict=True) if label >= 0]
        save_oof(out / OOF_FILE, labelled,
                 y, bundle.folders, calibrated(oof[chosen].logits, beta or 1.0), oof_scores)  # fmt: skip
        confusion_path = save_confusion_png(
            np.array(report["confusion_matrix"]),
            bundle.names,
            out / "confusion_matrix.png",
            title=f"{chosen}: out-of-fold predictions ({cv}-fold CV, {len(y)} images)",
        )
        return FitResult(report, model_path, report_path, confusion_path)


def _check_classes(features: Any, folders: np.ndarray, counts: np.ndarray, cv: int) -> None:
    if len(folders) < 2:
        raise FeatcacheError(
            f"{features}: need labelled images of at least 2 classes, found {len(folders)}: {LAYOUT}"
        )
    small = [f"{c} ({n})" for c, n in zip(folders, counts, strict=True) if n < cv]
    if small:
        raise FeatcacheError(
            f"{len(small)} class(es) have fewer images than the {cv} folds: {', '.join(small[:10])}; "
            f"add images, use fewer folds than cv={cv}, or remove those classes"
        )


def _folds(
    y: np.ndarray, groups: np.ndarray | None, cv: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds; with near-duplicate ``groups`` that join rows, stratified folds that keep
    every group whole."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    rows = np.zeros(len(y))
    if groups is None or len(np.unique(groups)) == len(y):
        return list(StratifiedKFold(cv, shuffle=True, random_state=seed).split(rows, y))
    return list(StratifiedGroupKFold(cv, shuffle=True, random_state=seed).split(rows, y, groups))


def _check_folds(
    folds: list[tuple[np.ndarray, np.ndarray]],
    y_idx: np.ndarray,
    folders: np.ndarray,
    groups: np.ndarray | None,
) -> None:
    """One line for folds a model cannot learn every class from (a class whose images are all
    near-duplicates of each other, or too few groups left after merging them)."""
    if groups is None:
        return
    for c, folder in enumerate(folders):
        n_groups = len(np.unique(groups[y_idx == c]))
        if n_groups == 1 and np.count_nonzero(y_idx == c) > 1:
            raise FeatcacheError(
                f"all {np.count_nonzero(y_idx == c)} images of class {folder} are near-duplicates of each "
                "other (one group), so no fold can test them on a model that has not seen them: "
                "add different images of it, or turn grouping off (group_duplicates=False)"
            )
    for i, (train, _) in enumerate(folds):
        missing = [str(folders[c]) for c in np.setdiff1d(np.arange(len(folders)), y_idx[train])]
        if missing:
            raise FeatcacheError(
                f"after keeping near-duplicate images in one fold, fold {i + 1} would train without class "
                f"{', '.join(missing[:5])}: use fewer folds, add images, or turn grouping off "
                "(group_duplicates=False)"
            )


def _fits(family: Family, plan: CVPlan) -> int:
    """How many fits one fold of ``family``'s grid takes (one per chain when one fit yields a chain)."""
    from sklearn.model_selection import ParameterGrid

    from featcache.crossval import chains

    settings = list(ParameterGrid(_grid(family, plan)))
    return len(chains(settings, family)) if family.one_fit else len(settings)


def _grid(family: Family, plan: CVPlan) -> dict[str, list]:
    """``family``'s grid with the plan's class weightings (left out when there is only no weighting)."""
    if plan.weightings == (None,):
        return family.grid
    return {**family.grid, "clf__class_weight": list(plan.weightings)}


def cross_validate_family(
    name: str,
    X: np.ndarray,
    y: np.ndarray,
    plan: CVPlan,
    fixed: dict[str, Any] | None = None,
    on_epoch: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], OutOfFold]:
    """Score every setting of family ``name``'s grid (with the plan's class weightings) on the
    plan's folds; return its report entry (the best setting's mean and std accuracy and balanced
    accuracy, macro F1 and smallest class recall, every setting's scores, fit time, unconverged
    fits) and the best setting's :class:`OutOfFold` results. ``fixed`` parameters are set on every
    pipeline and not reported (what :meth:`~featcache.models.Family.inputs` fixes); ``on_epoch``
    are the fit parameters that follow a fit's epochs."""
    from featcache.families import FAMILIES

    family = FAMILIES[name]
    start = time.perf_counter()
    grid, best_oof = _cross_validate_grid(family, X, y, plan, _grid(family, plan), fixed, on_epoch)
    best = max(grid, key=lambda g: g[METRICS[plan.select_by]])
    summary = {k: v for k, v in best.items() if k not in ("params", "not_converged")}
    report = {**summary, "best_params": best["params"], "fit_seconds": time.perf_counter() - start,
              "fits": len(grid) * len(plan.folds), "not_converged": sum(g["not_converged"] for g in grid),
              "grid": grid}  # fmt: skip
    return report, best_oof[grid.index(best)]


def _cross_validate_grid(
    family: Family, X: np.ndarray, y: np.ndarray, plan: CVPlan, grid: dict[str, list],
    fixed: dict[str, Any] | None = None, on_epoch: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], list[OutOfFold]]:  # fmt: skip
    """Every setting of ``grid``'s scores on the plan's folds, and its out-of-fold results (see
    :mod:`featcache.crossval`: warm-started chains, here or on the plan's Dask cluster)."""
    from sklearn.model_selection import ParameterGrid

    from featcache.crossval import Fits, cross_validate_settings

    settings = list(ParameterGrid(grid))
    fits = Fits(family, fixed or {}, plan.seed)
    logits_and_counts = cross_validate_settings(fits, X, y, plan.folds, settings, on_epoch, plan.scheduler)
    all_logits, unconverged = logits_and_counts
    scored, results = [], []
    classes = np.unique(y)
    for params, logits, n in zip(settings, all_logits, unconverged, strict=True):
        pred = classes[logits.argmax(axis=1)]
        scored.append({"params": params, **_scores(y, pred, plan.folds, classes), "not_converged": n})
        results.append(OutOfFold(logits, pred))
    return scored, results


def _scores(y: np.ndarray, pred: np.ndarray, folds: list, classes: np.ndarray) -> dict[str, float]:
    """Mean and std over the folds of accuracy, balanced accuracy and macro-F1, and the smallest
    recall of a class over all out-of-fold predictions."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score

    per_fold: dict[str, list[float]] = {"accuracy": [], "balanced_accuracy": [], "f1_macro": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fold without some class: its recall is left out, as it should
        for _, t in folds:
            present = np.unique(y[t])
            per_fold["accuracy"].append(accuracy_score(y[t], pred[t]))
            per_fold["balanced_accuracy"].append(balanced_accuracy_score(y[t], pred[t]))
            per_fold["f1_macro"].append(
                f1_score(y[t], pred[t], labels=present, average="macro", zero_division=0)
            )
        recalls = recall_score(y, pred, labels=classes, average=None, zero_division=0)
    out = {}
    for k, v in per_fold.items():
        out[f"cv_{k}_mean"] = float(np.mean(v))
        if k != "f1_macro":
            out[f"cv_{k}_std"] = float(np.std(v))
    return {**out, "min_recall": float(recalls.min())}


def _oof_report(
    result: dict[str, Any], oof: OutOfFold, y: np.ndarray, folders: np.ndarray, cache: Any
) -> dict[str, Any]:
    """The per-class table, confusion matrix and classes the chosen setting hardly recognises."""
    from sklearn.metrics import confusion_matrix

    from featcache.report import low_recall, per_class

    rows = per_class(y, oof.predicted, list(folders), cache.label_map)
    confusion = confusion_matrix(y, oof.predicted, labels=folders)
    return {"per_class": rows, "confusion_matrix": confusion.tolist(), "folders": folders.tolist(),
            "low_recall": low_recall(rows, confusion, cache.label_map)}  # fmt: skip


def _calibration(logits: np.ndarray, y_idx: np.ndarray, always: bool) -> tuple[float | None, dict[str, Any]]:
    """The temperature to save the model with (None: none) and the report's calibration entry."""
    from featcache.calibration import BINS, ECE_LIMIT, expected_calibration_error, fit_temperature

    before = expected_calibration_error(calibrated(logits, 1.0), y_idx)
    beta = fit_temperature(logits, y_idx) if always or before > ECE_LIMIT else None
    after = before if beta is None else expected_calibration_error(calibrated(logits, beta), y_idx)
    tried = beta
    if beta is not None and not always and after >= before:
        # one temperature minimises the log-loss; it cannot undo a class-weighted model's shifted
        # priors, and then it may raise the ECE: keep the probabilities as they are
        beta, after = None, before
    return beta, {"bins": BINS, "ece_before": before, "ece": after, "temperature_beta": beta,
                  "scaled": beta is not None, "margins": always, "temperature_tried": tried}  # fmt: skip


def _duplicates_report(
    groups: np.ndarray | None, grouped: dict[str, Any], ungrouped: dict[str, Any] | None, select_by: str
) -> dict[str, Any]:
    """How many rows near-duplicate grouping joined, and the chosen setting's CV with and without it."""
    if groups is None:
        return {"grouped": False}
    sizes = np.bincount(groups)
    report: dict[str, Any] = {"grouped": True, "groups": int(np.count_nonzero(sizes > 1)),
                              "rows": int(sizes[sizes > 1].sum())}  # fmt: skip
    if ungrouped is not None:
        key = METRICS[select_by]
        report.update(metric=select_by, with_grouping=grouped[key], without_grouping=ungrouped[0][key])
    return report


def _warn_low_recall(rows: list[dict[str, Any]], where: str) -> None:
    from featcache.report import low_recall_line

    for row in rows:
        warnings.warn(low_recall_line(row, where), FeatcacheWarning, stacklevel=3)


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
