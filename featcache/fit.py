"""``fit`` and ``evaluate``: cross-validate model families on a feature cache, keep the best, score it.

Working on a cache needs no torch; evaluating an image folder builds the backbone through
:class:`featcache.predictor.Predictor`, the same path as ``predict``.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featcache.bundle import DEFAULT_MODEL, MODEL_FILE, ModelBundle, load_bundle, save_bundle
from featcache.cache import read_cache
from featcache.choices import MODELS
from featcache.dataset import LabelMap
from featcache.errors import FeatcacheError
from featcache.files import writable_folder

if TYPE_CHECKING:
    from featcache.backbones.identity import BackboneIdentity
    from featcache.predictor import Predictor


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
    before converging are counted in the report. ``finetune`` (part of ``all`` when the cache
    keeps feature maps) trains on the maps; ``on_epoch(done, total)`` follows its epochs.
    The model is saved only once it is complete: a fit stopped at any point leaves the previous
    model in ``output`` as it was.
    """
    from sklearn.metrics import confusion_matrix
    from sklearn.model_selection import ParameterGrid, StratifiedKFold
    from threadpoolctl import threadpool_limits

    from featcache.models import FAMILIES, linear_head

    if model not in MODELS:
        raise FeatcacheError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    if not isinstance(cv, int) or cv < 2:
        raise FeatcacheError(f"cv must be an integer >= 2, got {cv!r}")
    cache = read_cache(features)
    if model in ("finetune", "all") and cache.identity.maps is not None:
        cache = read_cache(features, maps=True)
    if model == "finetune" and cache.maps is None:
        raise FeatcacheError(
            f"{features} keeps no feature maps to fine-tune on: extract with --maps STAGE "
            f"(e.g. featcache extract DATA_DIR -o maps.h5 --backbone {cache.identity.backbone} --maps 4), "
            "or choose another model"
        )
    out = writable_folder(output)
    X, y = cache.labelled()
    maps = cache.labelled(maps=True)[0] if cache.maps is not None else None
    folders, counts = np.unique(y, return_counts=True)
    if len(folders) < 2:
        raise FeatcacheError(f"{features}: need labelled images of at least 2 classes, found {len(folders)}")
    small = [f"{c} ({n})" for c, n in zip(folders, counts, strict=True) if n < cv]
    if small:
        raise FeatcacheError(
            f"{len(small)} class(es) have fewer images than the {cv} folds (cv={cv}): "
            f"{', '.join(small[:10])}; add images, lower cv, or remove those classes"
        )
    folds = list(StratifiedKFold(cv, shuffle=True, random_state=seed).split(X, y))
    families = (
        [n for n in FAMILIES if maps is not None or not FAMILIES[n].maps] if model == "all" else [model]
    )
    fixed = {"clf__identity": cache.identity.to_dict()} if maps is not None else {}
    epochs = _EpochCounter(on_epoch, families, cv)
    results: dict[str, Any] = {}
    oof: dict[str, np.ndarray] = {}
    for name in families:
        family = FAMILIES[name]
        if on_progress:
            on_progress(f"{name}: {len(ParameterGrid(family.grid))} settings x {cv} folds")
        inputs, extra = (maps, fixed) if family.maps else (X, {})
        with epochs.counting():
            results[name], oof[name] = cross_validate_family(name, inputs, y, folds, seed, extra)
    chosen = max(families, key=lambda n: results[n]["cv_accuracy_mean"])
    if on_progress:
        on_progress(f"refitting {chosen} on all {len(y)} images")
    family = FAMILIES[chosen]
    inputs, extra = (maps, fixed) if family.maps else (X, {})
    final = family.build_final(seed, {**results[chosen]["best_params"], **extra})
    with _convergence_warnings() as unconverged, threadpool_limits(family.blas_threads, "blas"):
        with epochs.counting():
            final.fit(inputs, y)
    epochs.finish()
    pred = oof[chosen]
    report = {
        "best": chosen,
        "cv": cv,
        "seed": seed,
        "n_images": int(len(y)),
        "n_classes": int(len(folders)),
        "families": results,
        "refit_converged": not unconverged,
        "per_class": _per_class(y, pred, list(folders), cache.label_map),
        "confusion_matrix": confusion_matrix(y, pred, labels=folders).tolist(),
        "folders": folders.tolist(),
        "features": str(Path(features).resolve()),
        "engine": cache.engine,
    }
    if family.maps:
        bundle = _finetuned_bundle(final, cache, folders.tolist(), report)
    else:
        bundle = ModelBundle.with_pipeline(
            final,
            family=chosen,
            folders=folders.tolist(),
            identity=cache.identity,
            label_map=cache.label_map,
            feature_dtype=cache.dtype,
            head=linear_head(final, X),
            report=report,
        )
    from featcache.report import save_confusion_png, save_json

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
) -> tuple[dict[str, Any], np.ndarray]:
    """Score every setting of family ``name``'s grid on ``folds``; return its report entry (the best
    setting's mean and std accuracy, macro F1, every setting's scores, fit time, unconverged fits)
    and the best setting's out-of-fold predictions. ``fixed`` parameters are set on every
    pipeline and not reported (a ``maps`` family's ``clf__identity``)."""
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import ParameterGrid, cross_validate
    from threadpoolctl import threadpool_limits

    from featcache.models import FAMILIES

    family = FAMILIES[name]
    start = time.perf_counter()
    grid = []
    for params in ParameterGrid(family.grid):
        pipe = family.build(seed).set_params(**params, **(fixed or {}))
        with _convergence_warnings() as unconverged, threadpool_limits(family.blas_threads, "blas"):
            cvr = cross_validate(pipe, X, y, cv=folds, return_estimator=True, return_indices=True)
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


class _EpochCounter:
    """Turns fine-tuning's epochs into ``on_epoch(done, total)`` over the whole fit: every setting
    and fold of the ``maps`` families, and the refit."""

    def __init__(self, on_epoch: Callable[[int, int], None] | None, families: list[str], cv: int):
        from sklearn.model_selection import ParameterGrid

        from featcache.finetune import FinetuneClassifier
        from featcache.models import FAMILIES

        self.on_epoch, self.done = on_epoch, 0
        per_fit = FinetuneClassifier().epochs
        tuned = [n for n in families if FAMILIES[n].maps]
        self.total = sum(len(ParameterGrid(FAMILIES[n].grid)) * cv * per_fit for n in tuned)
        self.total += per_fit if tuned else 0

    @contextmanager
    def counting(self) -> Iterator[None]:
        if self.on_epoch is None or not self.total:
            yield
            return
        from featcache.finetune import epoch_progress

        def advance(n: int) -> None:
            self.done += n
            self.on_epoch(self.done, self.total)

        with epoch_progress(advance):
            yield

    def finish(self) -> None:
        """Count the epochs that will not run (the refit of a family that is not fine-tuned)."""
        if self.on_epoch is not None and self.total and self.done < self.total:
            self.done = self.total
            self.on_epoch(self.done, self.total)


def _finetuned_bundle(final: Any, cache: Any, folders: list[str], report: dict[str, Any]) -> ModelBundle:
    """The bundle of a fitted ``finetune`` pipeline: the backbone identity with the fine-tuned part
    (its arrays travel in the bundle), and the new linear layer as the head of its pooled features.
    The fine-tuned network is converted for this machine's engine now, and checked, as a backbone
    is."""
    import dataclasses

    from featcache.backbones.build import build_backbone
    from featcache.backbones.identity import LAST, tuned_id
    from featcache.backbones.registry import get_entry
    from featcache.head import LinearHead

    clf = final.steps[-1][1]
    stage = cache.identity.maps
    entry = get_entry(cache.identity.backbone)
    identity = dataclasses.replace(
        cache.identity, layers=LAST, pool="avg", feature_dim=entry.feature_dim, maps=None,
        tuned=tuned_id(stage, clf.state_),
    )  # fmt: skip
    bundle = ModelBundle.with_pipeline(
        final,
        family="finetune",
        folders=folders,
        identity=identity,
        label_map=cache.label_map,
        feature_dtype="float32",
        head=LinearHead(clf.coef_, clf.intercept_),
        report=report,
        top=clf.state_,
    )
    build_backbone(identity, device="auto", top=clf.state_)
    return bundle


def _per_class(
    y: np.ndarray, pred: np.ndarray, folders: list[str], label_map: LabelMap
) -> list[dict[str, Any]]:
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(y, pred, labels=folders, zero_division=0)
    return [
        {"folder": c, "name": label_map.display(c), "precision": float(p[i]), "recall": float(r[i]),
         "f1": float(f[i]), "support": int(s[i])}
        for i, c in enumerate(folders)
    ]  # fmt: skip


@dataclass
class Evaluation:
    """Scores of a model on labelled data, with the prediction for every image scored.

    ``paths[i]`` (relative to the folder or cache root) is of class folder ``truth[i]`` and was
    predicted as ``predicted[i]``; ``skipped`` lists the images that could not be read.
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

    @property
    def n_images(self) -> int:
        return len(self.paths)


def evaluate(
    source: str | os.PathLike,
    model_path: str | os.PathLike = DEFAULT_MODEL,
    batch_size: int = 32,
    workers: int = 2,
    device: str = "auto",
    engine: str = "auto",
) -> Evaluation:
    """Score the model at ``model_path`` on a feature cache or on a labelled image folder.

    A cache must have been made with the model's backbone identity; a folder's images are
    classified exactly as ``predict`` classifies them (nothing is written).
    """
    source = Path(source)
    if not source.exists():
        raise FeatcacheError(f"{source}: no such feature cache or image folder")
    bundle = load_bundle(model_path)
    if source.is_dir():
        from featcache.predictor import Predictor

        predictor = Predictor(bundle, device=device, engine=engine, batch_size=batch_size, workers=workers)
        paths, truth, predicted, skipped = _predict_folder(predictor, source)
    else:
        cache = read_cache(source, maps=bundle.top is not None)
        differences = cache.identity.differences(_fit_on(bundle))
        if differences:
            raise FeatcacheError(
                f"{source} was extracted differently from the features {model_path} was fit on "
                f"({'; '.join(differences)}): re-extract with the model's backbone, "
                "or evaluate an image folder"
            )
        X, y = cache.labelled(maps=bundle.top is not None)
        paths = [p for p, label in zip(cache.paths, cache.labels, strict=True) if label >= 0]
        if bundle.top is not None:  # fine-tuned: the pipeline runs the trained part on the cached maps
            predicted = [str(c) for c in bundle.pipeline.predict(X)] if len(X) else []
        else:
            predicted = bundle.predict(X)
        truth, skipped = y.tolist(), cache.skipped
    if not paths:
        raise FeatcacheError(f"{source}: no labelled images to evaluate")
    unknown = sorted(set(truth) - set(bundle.folders))
    if unknown:
        raise FeatcacheError(
            f"{source}: class folder(s) the model does not know: {', '.join(unknown[:10])} "
            f"(model classes: {', '.join(bundle.folders[:10])}{'…' if len(bundle.folders) > 10 else ''})"
        )
    return _score(bundle, paths, truth, predicted, skipped)


def _fit_on(bundle: ModelBundle) -> BackboneIdentity:
    """The identity of the cache ``bundle`` was fit on (a fine-tuned model's records its maps)."""
    if bundle.top is None:
        return bundle.identity
    pipeline_identity = bundle.pipeline.steps[-1][1].identity
    from featcache.backbones.identity import BackboneIdentity

    return BackboneIdentity.from_dict(pipeline_identity)


def _predict_folder(
    predictor: Predictor, folder: Path
) -> tuple[list[str], list[str], list[str], list[tuple[str, str]]]:
    """Classify the labelled images of ``folder`` with ``predictor``, as ``predict`` would."""
    from featcache.dataset import scan

    dataset = scan(folder)
    files = [f for f in dataset.files if f.label >= 0]
    paths, truth, predicted = [], [], []
    skipped = list(dataset.unreadable)
    results = predictor.predict_files([dataset.path(f.relpath) for f in files])
    for f, p in zip(files, results, strict=True):
        if p.error is not None:
            skipped.append((f.relpath, p.error))
            continue
        paths.append(f.relpath)
        truth.append(dataset.folders[f.label])
        predicted.append(p.folder)
    return paths, truth, predicted, sorted(skipped, key=lambda s: os.fsencode(s[0]))


def _score(
    bundle: ModelBundle, paths: list[str], truth: list[str], predicted: list[str], skipped: list
) -> Evaluation:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    y, pred = np.array(truth), np.array(predicted)
    return Evaluation(
        accuracy=float(accuracy_score(y, pred)),
        macro_f1=float(f1_score(y, pred, labels=sorted(set(truth)), average="macro", zero_division=0)),
        per_class=_per_class(y, pred, bundle.folders, bundle.label_map),
        confusion=confusion_matrix(y, pred, labels=bundle.folders),
        folders=bundle.folders,
        paths=paths,
        truth=truth,
        predicted=predicted,
        skipped=skipped,
    )
