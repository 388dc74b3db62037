"""Which features the out-of-distribution score should measure distances on: the variants tried
for issue 27, on the caches ``bench/trust.py`` leaves in its work folder.

    python bench/ood_variants.py WORKDIR

For each variant: the threshold is the 95th percentile of 5-fold out-of-fold scores of the
imbalanced training cache; "kept" is the share of the held-out in-distribution images under it,
"flagged" the share of out-of-distribution images over it. Far: handwritten digits (a cache of
WORKDIR/digits is made if missing); near: shirt and bag held out of the training classes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from harness import recorded

from featcache.cache import read_cache
from featcache.extract import extract

Score = Callable[[np.ndarray], np.ndarray]


def mahalanobis(
    normalise: bool, standardise: bool, components: int
) -> Callable[[np.ndarray, np.ndarray], Score]:
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    def fit(X: np.ndarray, y: np.ndarray) -> Score:
        def prepared(Z: np.ndarray) -> np.ndarray:
            return Z / np.linalg.norm(Z, axis=1, keepdims=True) if normalise else Z

        Z = prepared(X)
        mean = Z.mean(axis=0)
        scale = Z.std(axis=0) if standardise else np.ones(Z.shape[1])
        scale = np.maximum(scale, 0.1 * np.median(scale) + 1e-12)
        pca = PCA(components, svd_solver="randomized", random_state=0).fit((Z - mean) / scale)
        R = pca.transform((Z - mean) / scale)
        centers = np.stack([R[y == c].mean(axis=0) for c in np.unique(y)])
        precision = (
            LedoitWolf(assume_centered=True).fit(R - centers[np.searchsorted(np.unique(y), y)]).precision_
        )

        def score(Xn: np.ndarray) -> np.ndarray:
            W = pca.transform((prepared(Xn) - mean) / scale)
            d = np.stack([np.einsum("ij,jk,ik->i", W - c, precision, W - c) for c in centers], axis=1)
            return np.sqrt(d.min(axis=1) / components)

        return score

    return fit


def knn_cosine(k: int) -> Callable[[np.ndarray, np.ndarray], Score]:
    def fit(X: np.ndarray, y: np.ndarray) -> Score:
        U = X / np.linalg.norm(X, axis=1, keepdims=True)

        def score(Xn: np.ndarray) -> np.ndarray:
            V = Xn / np.linalg.norm(Xn, axis=1, keepdims=True)
            return -np.sort(V @ U.T, axis=1)[:, -k]

        return score

    return fit


def kept_and_flagged(fit, X, y, inside, outside) -> tuple[float, float]:
    from sklearn.model_selection import StratifiedKFold

    oof = np.zeros(len(y))
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(X, y):
        oof[test] = fit(X[train], y[train])(X[test])
    score, threshold = fit(X, y), np.quantile(oof, 0.95)
    return float(np.mean(score(inside) <= threshold)), float(np.mean(score(outside) > threshold))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    work = parser.parse_args().workdir
    with recorded():
        if not (work / "digits.h5").is_file():
            extract(work / "digits", work / "digits.h5", backbone="efficientnet_lite0", engine="openvino")
        train, test, digits = (read_cache(work / f) for f in ("train.h5", "test.h5", "digits.h5"))
        X, y = train.features.astype(np.float64), train.labels
        X_test, y_test = test.features.astype(np.float64), test.labels
        held = ("shirt", "bag")
        known = np.array([train.folders[c] not in held for c in y])
        known_test = np.array([test.folders[c] not in held for c in y_test])
        variants = {
            "standardised, PCA 128": mahalanobis(False, True, 128),
            "standardised, PCA 32": mahalanobis(False, True, 32),
            "standardised, PCA 512": mahalanobis(False, True, 512),
            "raw, PCA 128": mahalanobis(False, False, 128),
            "L2-normalised, standardised, PCA 128": mahalanobis(True, True, 128),
            "L2-normalised, PCA 64": mahalanobis(True, False, 64),
            "L2-normalised, PCA 128 (featcache)": mahalanobis(True, False, 128),
            "L2-normalised, PCA 256": mahalanobis(True, False, 256),
            "k-NN cosine, k=10": knn_cosine(10),
        }
        print(f"{'variant':38} {'far: kept':>10} {'flagged':>8}   {'near: kept':>10} {'flagged':>8}")
        for name, fit in variants.items():
            far = kept_and_flagged(fit, X, y, X_test, digits.features.astype(np.float64))
            near = kept_and_flagged(fit, X[known], y[known], X_test[known_test], X_test[~known_test])
            shares = [100 * v for v in (*far, *near)]
            print(f"{name:38} " + "{:9.1f}% {:7.1f}%   {:9.1f}% {:7.1f}%".format(*shares))


if __name__ == "__main__":
    main()
