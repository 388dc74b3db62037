"""How far predicted probabilities are from observed accuracy, and temperature scaling to close it.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) divides a
classifier's logits by one positive temperature before the softmax (here: multiplies them by
``beta = 1 / T``). It changes no prediction, only how confident each one is. NumPy and SciPy only.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from featcache.training import softmax_rows

BINS = 15
"""Confidence bins of :func:`expected_calibration_error` (equal widths on [0, 1])."""
ECE_LIMIT = 0.05
"""``fit`` scales the temperature of a model whose out-of-fold ECE is above this."""


class Reliability(NamedTuple):
    """Per confidence bin: the mean confidence of its predictions, their accuracy and their count
    (NaN confidence and accuracy in an empty bin)."""

    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def reliability(proba: np.ndarray, y_idx: np.ndarray, bins: int = BINS) -> Reliability:
    """The reliability diagram's data of N×K probabilities ``proba`` for true class indices ``y_idx``."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y_idx
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, confidence, bins) / count
        accuracy = np.bincount(which, correct.astype(float), bins) / count
    return Reliability(mean_conf, accuracy, count)


def expected_calibration_error(proba: np.ndarray, y_idx: np.ndarray, bins: int = BINS) -> float:
    """ECE: the mean over ``bins`` confidence bins of |accuracy - confidence|, weighted by the share of
    predictions in each bin (0: perfectly calibrated)."""
    r = reliability(proba, y_idx, bins)
    used = r.count > 0
    return float(np.sum(r.count[used] * np.abs(r.accuracy[used] - r.confidence[used])) / max(len(y_idx), 1))


def fit_temperature(logits: np.ndarray, y_idx: np.ndarray) -> float:
    """The ``beta`` (> 0) that minimises the negative log-likelihood of ``softmax(beta * logits)`` for
    the true classes ``y_idx`` (logits held out from the model that made them, e.g. out of fold)."""
    from scipy.optimize import minimize_scalar

    rows = np.arange(len(y_idx))

    def nll(log_beta: float) -> float:
        z = np.exp(log_beta) * logits
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[rows, y_idx]))

    result = minimize_scalar(nll, bounds=(-7.0, 7.0), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


def calibrated(logits: np.ndarray, beta: float) -> np.ndarray:
    """The probabilities of ``logits`` at ``beta``: ``softmax(beta * logits)``."""
    return softmax_rows(beta * np.asarray(logits, dtype=np.float64))
