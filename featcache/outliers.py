"""An out-of-distribution score: how unlike the training images an image's features are.

A softmax always names one of its classes, however strange the image. The distance of the
features to the nearest class mean, measured with the covariance of the training features
(Mahalanobis; Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples
and Adversarial Attacks", NeurIPS 2018), says when an image is unlike all of them. The features
are L2-normalised, centred and reduced by PCA; the shared covariance of the class residuals is
shrunk (Ledoit-Wolf) so that it can be inverted with fewer images than dimensions. Normalising
without scaling each feature was chosen by measurement (``bench/trust.py``'s data: 100 % of
handwritten digits flagged against 40 % with per-feature standardisation, at the same 94 % of
held-out in-distribution images kept). Scoring is plain NumPy: what is fitted is kept as three
arrays and two numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

COMPONENTS = 128
"""PCA components the distance is measured in (at most: fewer when the features have fewer)."""
KEEP = 0.95
"""Share of in-distribution images the default threshold keeps (a quantile of out-of-fold scores)."""


@dataclass(frozen=True)
class OutlierScore:
    """``score(X)``: the Mahalanobis distance of each L2-normalised row to the nearest class mean,
    divided by the square root of the dimensions it is measured in (about 1 for a typical
    training image).

    ``(X / |X| - mean) @ projection`` centres, reduces and whitens the features at once;
    ``centers`` are the class means there, one row per class. An image scoring above
    ``threshold`` is unknown; the threshold keeps ``keep`` of the in-distribution images it was
    set on (out of fold).
    """

    mean: np.ndarray
    projection: np.ndarray
    centers: np.ndarray
    threshold: float = float("inf")
    keep: float = KEEP

    def __post_init__(self) -> None:
        d, p = self.projection.shape
        if self.mean.shape != (d,) or self.centers.ndim != 2 or self.centers.shape[1] != p:
            raise ValueError(
                f"an outlier score needs mean (d,), projection d×p and centers k×p; got "
                f"{self.mean.shape}, {self.projection.shape}, {self.centers.shape}"
            )
        if not (self.threshold > 0 and 0 < self.keep <= 1):
            raise ValueError(f"threshold must be > 0 and keep in (0, 1]; got {self.threshold}, {self.keep}")

    @property
    def n_classes(self) -> int:
        return self.centers.shape[0]

    @property
    def n_features(self) -> int:
        return self.mean.shape[0]

    def score(self, X: np.ndarray) -> np.ndarray:
        """N×D features → N scores (float64); larger is less like the training images."""
        u = (unit_rows(np.asarray(X, dtype=np.float64)) - self.mean) @ self.projection
        c = self.centers
        d2 = (u * u).sum(axis=1)[:, None] - 2 * u @ c.T + (c * c).sum(axis=1)
        return np.sqrt(np.maximum(d2.min(axis=1), 0) / self.projection.shape[1]) if len(u) else np.zeros(0)

    def unknown(self, X: np.ndarray) -> np.ndarray:
        """Whether each row of N×D features scores above the threshold."""
        return self.score(X) > self.threshold

    def with_threshold(self, scores: np.ndarray, keep: float = KEEP) -> OutlierScore:
        """This score with the threshold that keeps ``keep`` of ``scores`` (of held-out in-distribution
        images: in-sample scores are smaller, and their threshold would flag too many)."""
        from dataclasses import replace

        return replace(self, threshold=float(np.quantile(scores, keep)), keep=float(keep))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "projection": self.projection, "centers": self.centers,
                "threshold": float(self.threshold), "keep": float(self.keep)}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OutlierScore:
        arrays = {k: np.asarray(d[k], dtype=np.float64) for k in ("mean", "projection", "centers")}
        return cls(**arrays, threshold=float(d["threshold"]), keep=float(d["keep"]))


def fit_outlier_score(
    X: np.ndarray, y_idx: np.ndarray, components: int = COMPONENTS, moments: Moments | None = None
) -> OutlierScore:
    """The :class:`OutlierScore` of features ``X`` with class indices ``y_idx`` (0..K-1, every class
    present), without a threshold yet (see :meth:`OutlierScore.with_threshold`). ``moments`` are
    those of ``X``'s unit rows when already known (see :func:`out_of_fold`)."""
    from sklearn.covariance import LedoitWolf

    U = unit_rows(np.asarray(X, dtype=np.float64))
    n, total, gram = moments or Moments.of(U)
    mean = total / n
    p = min(components, U.shape[1], max(n - 1, 1))
    if p < U.shape[1]:  # PCA: the leading eigenvectors of the covariance
        eigenvalues, vectors = np.linalg.eigh(gram / n - np.outer(mean, mean))
        reduce = vectors[:, np.argsort(eigenvalues)[::-1][:p]]
    else:
        reduce = np.eye(U.shape[1])
    Z = (U - mean) @ reduce
    k = int(y_idx.max()) + 1
    class_means = np.stack([Z[y_idx == c].mean(axis=0) for c in range(k)])
    precision = LedoitWolf(assume_centered=True).fit(Z - class_means[y_idx]).precision_
    whiten = np.linalg.cholesky((precision + precision.T) / 2)  # precision = whiten @ whiten.T
    return OutlierScore(mean, reduce @ whiten, class_means @ whiten)


def out_of_fold(
    X: np.ndarray, y_idx: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[OutlierScore, np.ndarray]:
    """The :class:`OutlierScore` of features ``X`` (fit on all rows) with its threshold set on the
    out-of-fold scores of ``folds`` (whose test rows are all of ``X``'s, once each), and those
    out-of-fold scores. Each fold's moments are all rows' less its test rows'."""
    U = unit_rows(np.asarray(X, dtype=np.float64))
    parts = [Moments.of(U[test]) for _, test in folds]
    whole = Moments(*(sum(m[i] for m in parts) for i in range(3)))
    if whole.n != len(U):
        raise ValueError(f"the folds' test rows must be the {len(U)} rows once each, got {whole.n}")
    oof = np.zeros(len(U))
    for (train, test), part in zip(folds, parts, strict=True):
        held_out = Moments(whole.n - part.n, whole.total - part.total, whole.gram - part.gram)
        oof[test] = fit_outlier_score(U[train], y_idx[train], moments=held_out).score(U[test])
    return fit_outlier_score(U, y_idx, moments=whole).with_threshold(oof), oof


class Moments(NamedTuple):
    """The count, sum and Gram matrix (``U.T @ U``) of rows ``U``: a PCA's input, which adds up over
    row subsets."""

    n: int
    total: np.ndarray
    gram: np.ndarray

    @classmethod
    def of(cls, U: np.ndarray) -> Moments:
        return cls(len(U), U.sum(axis=0), U.T @ U)


def row_lengths(X: np.ndarray) -> np.ndarray:
    """The Euclidean length of each row of ``X`` (without an N×D temporary)."""
    return np.sqrt(np.einsum("ij,ij->i", X, X))


def unit_rows(X: np.ndarray) -> np.ndarray:
    """The rows of ``X`` scaled to length 1 (a zero row stays zero; ``X`` itself when they are)."""
    lengths = row_lengths(X)[:, None]
    return X if np.allclose(lengths, 1, atol=1e-5) else X / np.maximum(lengths, 1e-12)
