"""What a feature cache says about its own images: probable label errors, duplicates (with
conflicting labels first), test images that copy training ones, and images far from their class.

Label issues follow confident learning (Northcutt, Jiang and Chuang, "Confident Learning:
Estimating Uncertainty in Dataset Labels", JAIR 70, 2021): each class's threshold is the mean
out-of-fold probability of that class over its own images; an image is flagged when the
probability of its folder's class is below that class's threshold while another class is above
its own, or when another class is simply more probable; flagged images are ranked by
self-confidence (the probability of the given label, lowest first). The probabilities are the
out-of-fold ones ``fit`` keeps (``oof.npz`` beside the model) when they are for exactly this
cache's labelled rows, else those of a strongly regularised logistic regression (C 0.003,
chosen on ``bench/audit.py``'s planted errors; class-weighted on imbalanced classes)
cross-validated here.

Nothing here reads or writes the image folder except to hash the files of a duplicate group.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from featcache.cache import FeatureCache, read_cache
from featcache.choices import IMBALANCE
from featcache.difference import worded
from featcache.duplicates import (
    SIMILARITY,
    SimilarPairs,
    groups_of,
    principal_basis,
    similar_pairs,
)
from featcache.errors import FeatcacheError
from featcache.outliers import row_lengths, unit_rows

FOLDS = 5
"""Folds of the logistic regression whose out-of-fold probabilities rank label issues when no
matching ``oof.npz`` is there."""
NEIGHBOURS = 5
"""An outlier's score is the cosine distance to its NEIGHBOURS-th nearest image of its class."""
OUTLIERS_PER_CLASS = 5
"""Outliers reported per class by default."""


@dataclass(frozen=True)
class LabelIssue:
    """An image whose folder the out-of-fold probabilities doubt: ``self_confidence`` is the
    probability of its ``given`` class, ``suggested`` the class it more likely belongs to (with
    ``suggested_probability``); ``confident`` when confident learning flags it, not only the
    most probable class."""

    kind: ClassVar[str] = "label_issue"
    path: str
    given: str
    suggested: str
    self_confidence: float
    suggested_probability: float
    confident: bool = True


@dataclass(frozen=True)
class DuplicateGroup:
    """Images whose embeddings are near-duplicates (joined by pairs of cosine similarity >= the
    threshold; ``similarity`` is the lowest of those pairs). ``labels`` are their class folders
    (None: unlabelled); ``exact`` when their files are byte for byte the same (None when a file
    could not be read). A group with more than one label is a label conflict."""

    paths: tuple[str, ...]
    labels: tuple[str | None, ...]
    similarity: float
    exact: bool | None

    @property
    def conflict(self) -> bool:
        return len({label for label in self.labels if label is not None}) > 1

    @property
    def kind(self) -> str:
        return "conflict" if self.conflict else "duplicates"


@dataclass(frozen=True)
class Leak:
    """An image of the other cache (``path``, class ``label``) that near-duplicates the image
    ``train_path`` (class ``train_label``) of the audited one."""

    kind: ClassVar[str] = "leak"
    path: str
    label: str | None
    train_path: str
    train_label: str | None
    similarity: float
    exact: bool | None


@dataclass(frozen=True)
class Outlier:
    """An image far from the other images of its class: ``score`` is the cosine distance to its
    :data:`NEIGHBOURS`-th nearest neighbour there; ``rank`` 1 is its class's farthest."""

    kind: ClassVar[str] = "outlier"
    path: str
    label: str
    score: float
    rank: int


Finding = LabelIssue | DuplicateGroup | Leak | Outlier


@dataclass
class AuditResult:
    """The findings of :func:`audit`, each list most suspicious first (conflicting duplicate
    groups before the others). ``probabilities`` says where the out-of-fold probabilities came
    from; ``notes`` what was skipped and why; ``data_root`` (and ``against_root``) are the
    folders the paths are relative to."""

    features: str
    n_images: int
    classes: list[str]
    counts: dict[str, int]
    data_root: str
    label_issues: list[LabelIssue] = field(default_factory=list)
    duplicates: list[DuplicateGroup] = field(default_factory=list)
    leaks: list[Leak] = field(default_factory=list)
    outliers: list[Outlier] = field(default_factory=list)
    probabilities: str = ""
    similarity: float = SIMILARITY
    against: str | None = None
    against_root: str | None = None
    against_images: int = 0
    notes: list[str] = field(default_factory=list)

    def findings(self) -> Iterator[Finding]:
        """Every finding: label conflicts, label issues, other duplicates, leaks, outliers."""
        yield from (g for g in self.duplicates if g.conflict)
        yield from self.label_issues
        yield from (g for g in self.duplicates if not g.conflict)
        yield from self.leaks
        yield from self.outliers

    def per_class(self) -> dict[str, dict[str, int]]:
        """Per class folder: its images, label issues (by given label), images in duplicate
        groups and outliers."""
        table = {c: {"images": self.counts.get(c, 0), "label_issues": 0, "in_duplicates": 0, "outliers": 0}
                 for c in self.classes}  # fmt: skip
        for issue in self.label_issues:
            table[issue.given]["label_issues"] += 1
        for group in self.duplicates:
            for label in group.labels:
                if label in table:
                    table[label]["in_duplicates"] += 1
        for outlier in self.outliers:
            table[outlier.label]["outliers"] += 1
        return table


def finding_dict(finding: Finding) -> dict[str, Any]:
    """One finding as a JSON-ready dict, ``kind`` first."""
    body = asdict(finding)
    for key in ("paths", "labels"):
        if key in body:
            body[key] = list(body[key])
    for key in ("self_confidence", "suggested_probability", "similarity", "score"):
        if key in body:
            body[key] = round(float(body[key]), 4)
    return {"kind": finding.kind, **body}


def audit(
    features: str | os.PathLike = "features.h5",
    against: str | os.PathLike | None = None,
    model_path: str | os.PathLike | None = None,
    similarity: float = SIMILARITY,
    outliers: int = OUTLIERS_PER_CLASS,
    seed: int = 0,
    on_progress: Callable[[str], None] | None = None,
) -> AuditResult:
    """Audit the cache ``features``: label issues, near-duplicate groups, outliers, and with
    ``against`` (another cache of the same backbone, e.g. the test set's) the images of that
    cache that near-duplicate one of this cache's.

    ``model_path`` is a model bundle fit on this cache, beside which ``fit`` kept the
    out-of-fold probabilities (default: ``models/best.joblib`` when it is there); when they are
    not for exactly this cache's labelled rows, a ``FOLDS``-fold logistic regression computes
    them here. Near-duplicates have cosine similarity >= ``similarity``; ``outliers`` is how
    many are reported per class (0: none).
    """
    if not 0 < similarity <= 1:
        raise FeatcacheError(f"similarity must be in (0, 1], got {similarity!r}")
    if not isinstance(outliers, int) or outliers < 0:
        raise FeatcacheError(f"outliers must be an integer >= 0, got {outliers!r}")
    progress = on_progress or (lambda message: None)
    cache = read_cache(features)
    other = None
    if against is not None:
        other = read_cache(against)
        if differences := other.identity.differences(cache.identity):
            raise FeatcacheError(
                f"{against} was extracted differently from {features} ({worded(differences)}): "
                "extract both with the same backbone and settings"
            )
    if not len(cache):
        raise FeatcacheError(f"{features}: the cache holds no images")
    labelled = cache.labels >= 0
    given = np.array([cache.folders[i] if i >= 0 else None for i in cache.labels], dtype=object)
    classes, counts = np.unique(given[labelled].astype(str), return_counts=True)
    counted = dict(zip(classes.tolist(), counts.tolist(), strict=True))
    result = AuditResult(
        str(features), len(cache), classes.tolist(), counted, cache.data_root, similarity=similarity
    )
    kept = (None, "")
    if len(classes) >= 2:  # a model named explicitly is checked before the work starts
        kept = _kept_probabilities(cache, model_path)
    X = np.asarray(cache.features, dtype=np.float32)
    X /= np.maximum(row_lengths(X), 1e-12)[:, None]  # in place: the raw rows are not used again

    progress("near-duplicates")
    pairs = similar_pairs(X, similarity=similarity)
    groups = groups_of(pairs, len(cache))
    result.duplicates = _duplicate_groups(cache, given, pairs, groups)

    if other is not None:
        progress(f"leaks from {against}")
        result.against, result.against_root, result.against_images = str(against), other.data_root, len(other)
        result.leaks = _leaks(cache, other, given, similarity)

    if not labelled.any():
        result.notes.append("no labelled images (no class folders): label issues and outliers skipped")
        return result
    if len(classes) < 2:
        result.notes.append(f"one class ({classes[0]}): no label issues to find, nothing to confuse it with")
    else:
        progress("label issues")
        proba, folders, whence = _probabilities(cache, X, kept, groups, seed, result.notes)
        result.probabilities = whence
        if proba is not None:
            paths = [p for p, keep in zip(cache.paths, labelled, strict=True) if keep]
            result.label_issues = label_issues(proba, given[labelled].astype(str), folders, paths)
    if outliers:
        progress("outliers")
        result.outliers = _outliers(cache, X, given, outliers, result.notes)
    return result


def label_issues(
    proba: np.ndarray, given: np.ndarray, folders: list[str], paths: list[str]
) -> list[LabelIssue]:
    """The label issues among rows with out-of-fold probabilities ``proba`` (columns in the
    order of ``folders``) and given class folders ``given``, lowest self-confidence first.

    A row is an issue when confident learning flags it (``confident``: its given class is below
    that class's threshold while another class is above its own, which is then ``suggested``) or
    when another class is the most probable (then ``suggested``). Confident learning alone
    misses planted errors when the probabilities are soft: on ``bench/audit.py``'s 6,000 images
    with 300 in a wrong folder (``fit``'s out-of-fold probabilities) the first 300 it flagged
    held 214 of them, the 300 rows of lowest self-confidence 264."""
    column = {f: k for k, f in enumerate(folders)}
    y = np.array([column[g] for g in given])
    rows = np.arange(len(y))
    thresholds = np.array([proba[y == k, k].mean() if (y == k).any() else 1.0 for k in range(len(folders))])
    self_confidence = proba[rows, y]
    above = proba >= thresholds
    above[rows, y] = False
    confident = (self_confidence < thresholds[y]) & above.any(axis=1)
    others = proba.copy()
    others[rows, y] = -1.0
    suggested = np.where(confident, np.where(above, proba, -1.0).argmax(axis=1), others.argmax(axis=1))
    flagged = np.flatnonzero(confident | (others.max(axis=1) > self_confidence))
    flagged = flagged[np.argsort(self_confidence[flagged], kind="stable")]
    return [
        LabelIssue(
            paths[i],
            str(given[i]),
            folders[suggested[i]],
            float(self_confidence[i]),
            float(proba[i, suggested[i]]),
            bool(confident[i]),
        )  # fmt: skip
        for i in flagged
    ]


def file_digest(path: Path) -> str | None:
    """The BLAKE2b digest of a file's bytes, or None when it cannot be read."""
    try:
        digest = hashlib.blake2b()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()
    except OSError:
        return None


def _duplicate_groups(
    cache: FeatureCache, given: np.ndarray, pairs: SimilarPairs, groups: np.ndarray
) -> list[DuplicateGroup]:
    weakest: dict[int, float] = {}
    for i, s in zip(pairs.first, pairs.similarity, strict=True):
        weakest[groups[i]] = min(weakest.get(groups[i], 1.0), float(s))
    root = Path(cache.data_root)
    found = []
    for group, lowest in weakest.items():
        members = np.flatnonzero(groups == group)
        digests = [file_digest(root / cache.paths[i]) for i in members]
        exact = None if None in digests else len(set(digests)) == 1
        paths = tuple(cache.paths[i] for i in members)
        found.append(DuplicateGroup(paths, tuple(given[members]), lowest, exact))
    return sorted(found, key=lambda g: (not g.conflict, -len(g.paths), -g.similarity, g.paths))


def _leaks(cache: FeatureCache, other: FeatureCache, given: np.ndarray, similarity: float) -> list[Leak]:
    pairs = similar_pairs(other.features, cache.features, similarity=similarity)
    best: dict[int, tuple[float, int]] = {}
    for i, j, s in zip(pairs.first, pairs.second, pairs.similarity, strict=True):
        if s > best.get(i, (-1.0, 0))[0]:
            best[i] = (float(s), int(j))
    leaks = []
    for i, (s, j) in best.items():
        mine = file_digest(Path(other.data_root) / other.paths[i])
        theirs = file_digest(Path(cache.data_root) / cache.paths[j])
        label = other.folders[other.labels[i]] if other.labels[i] >= 0 else None
        exact = None if mine is None or theirs is None else mine == theirs
        leaks.append(Leak(other.paths[i], label, cache.paths[j], given[j], s, exact))
    return sorted(leaks, key=lambda leak: (-leak.similarity, leak.path))


def _probabilities(
    cache: FeatureCache, X: np.ndarray, kept: tuple[Any, str], groups: np.ndarray, seed: int, notes: list[str]
) -> tuple[np.ndarray | None, list[str], str]:
    """The out-of-fold probabilities of the labelled rows (``kept[0]`` when ``fit``'s are for
    them, else computed), their column folders, and whence."""
    kept, why = kept
    if kept is not None:
        return kept
    labelled = cache.labels >= 0
    y = cache.labels[labelled]
    folders = [cache.folders[k] for k in np.unique(y)]
    column = {k: n for n, k in enumerate(np.unique(y))}
    y_idx = np.array([column[k] for k in y])
    smallest = np.bincount(y_idx).min()
    folds = min(FOLDS, int(smallest))
    if folds < 2:
        notes.append("a class has a single image: label issues skipped (cross-validation needs 2 per class)")
        return None, folders, ""
    proba = out_of_fold_probabilities(X[labelled], y_idx, folds, seed, groups[labelled])
    return proba, folders, f"logistic regression, {folds}-fold cross-validation, computed here ({why})"


def _kept_probabilities(
    cache: FeatureCache, model_path: str | os.PathLike | None
) -> tuple[tuple[np.ndarray, list[str], str] | None, str]:
    """``fit``'s out-of-fold probabilities when they are for this cache's labelled rows, or None
    and why not. A model named explicitly that was not fit on this cache is an error."""
    from featcache.bundle import load_bundle, resolve_model_path
    from featcache.oof import OOF_FILE, load_oof

    explicit = model_path is not None
    path = resolve_model_path(model_path if explicit else "models")
    if not path.is_file():
        if explicit:
            raise FeatcacheError(f"{model_path}: no such model bundle")
        return None, "no model in models/"
    bundle = load_bundle(path)
    differences = cache.identity.differences(bundle.fit_identity)
    classes = sorted({cache.folders[k] for k in cache.labels if k >= 0})
    if differences or sorted(bundle.folders) != classes:
        why = (
            f"{path} was fit on features extracted differently ({worded(differences)})"
            if differences
            else f"{path} was fit on classes {', '.join(bundle.folders)}, the cache has {', '.join(classes)}"
        )
        if explicit:
            raise FeatcacheError(f"{why}: fit a model on this cache, or audit without --model-path")
        return None, why
    oof_path = path.parent / OOF_FILE
    if not oof_path.is_file():
        return None, f"no {OOF_FILE} beside {path}"
    oof = load_oof(oof_path)
    labelled = cache.labels >= 0
    paths = [p for p, keep in zip(cache.paths, labelled, strict=True) if keep]
    truth = [cache.folders[k] for k in cache.labels[labelled]]
    row = {p: n for n, p in enumerate(oof["paths"].tolist())}
    if sorted(row) != sorted(paths):
        return None, f"{oof_path} is for other images than the cache's (fit again to refresh it)"
    order = np.array([row[p] for p in paths])
    if oof["truth"][order].tolist() != truth:
        return None, f"{oof_path} has other labels than the cache's (fit again to refresh it)"
    return (oof["probabilities"][order], oof["folders"].tolist(), f"{oof_path} (fit's out-of-fold)"), ""


def out_of_fold_probabilities(
    X: np.ndarray,
    y_idx: np.ndarray,
    folds: int = FOLDS,
    seed: int = 0,
    groups: np.ndarray | None = None,
    balanced: bool | None = None,
) -> np.ndarray:
    """Out-of-fold class probabilities (columns: classes 0..K-1) of a logistic regression on the
    L2-normalised rows ``X`` reduced to their 256 principal directions and standardised, with
    stratified folds that keep each near-duplicate group whole. ``balanced`` weighs each class
    the same (None: when the largest class has 1.5× the images of the smallest, as ``fit``'s
    ``auto``); unweighted, a small class's own images look doubtful and fill the issues."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from featcache.fit import _folds

    U = unit_rows(X)
    U = StandardScaler(copy=False).fit_transform(U @ principal_basis(U, 256))
    proba = np.zeros((len(U), int(y_idx.max()) + 1), dtype=np.float32)
    counts = np.bincount(y_idx)
    if balanced is None:
        balanced = bool(counts.max() >= IMBALANCE * counts[counts > 0].min())
    weighting = "balanced" if balanced else None
    for train, test in _folds(y_idx, groups, folds, seed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(C=0.003, max_iter=300, class_weight=weighting).fit(
                U[train], y_idx[train]
            )
        proba[np.ix_(test, model.classes_)] = model.predict_proba(U[test])
    return proba


def _outliers(
    cache: FeatureCache, U: np.ndarray, given: np.ndarray, per_class: int, notes: list[str]
) -> list[Outlier]:
    """The ``per_class`` images of each class farthest from the others (``U``: the rows, L2-normalised)."""
    found = []
    small = []
    for folder in sorted(set(given[cache.labels >= 0])):
        rows = np.flatnonzero(given == folder)
        if len(rows) <= NEIGHBOURS:
            small.append(folder)
            continue
        kth = np.empty(len(rows), dtype=np.float32)
        step = max(1, 2**24 // len(rows))
        for start in range(0, len(rows), step):
            sims = U[rows[start : start + step]] @ U[rows].T
            # the NEIGHBOURS+1-th largest: the image itself is the first
            kth[start : start + step] = -np.partition(-sims, NEIGHBOURS, axis=1)[:, NEIGHBOURS]
        order = np.argsort(kth, kind="stable")[:per_class]
        found += [
            Outlier(cache.paths[rows[k]], folder, float(1 - kth[k]), rank) for rank, k in enumerate(order, 1)
        ]
    if small:
        notes.append(f"outliers need more than {NEIGHBOURS} images of a class: skipped {', '.join(small)}")
    return sorted(found, key=lambda o: (-o.score, o.path))


def write_relabel(result: AuditResult, path: str | os.PathLike) -> Path:
    """Write the label issues as a CSV file ``path,given,suggested`` that ``fit --relabel`` reads:
    edit the ``suggested`` column (empty: leave the image out) and keep the rows you agree with."""
    import csv

    from featcache.files import replaced_atomically

    path = Path(path)
    with replaced_atomically(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "given", "suggested"])
            writer.writerows((issue.path, issue.given, issue.suggested) for issue in result.label_issues)
    return path
