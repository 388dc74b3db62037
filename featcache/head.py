"""A fitted linear model's probabilities as plain arrays, so that predicting needs NumPy alone.

Every family featcache fits is scaling followed by a linear map and a softmax (logistic
regression, the softmax head, the temperature-calibrated linear SVM). ``fit`` saves that map
beside the pickled pipeline when, and only when, it reproduces the pipeline's probabilities on
the training features; ``predict`` then has no scikit-learn to import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LinearHead:
    """``predict_proba(X) = softmax(beta * (X @ coef.T + intercept))``, one column per class."""

    coef: np.ndarray
    intercept: np.ndarray
    beta: float = 1.0

    def __post_init__(self) -> None:
        k, _ = self.coef.shape
        if self.intercept.shape != (k,) or not self.beta > 0:
            raise ValueError(
                f"a linear head needs coef k×d, intercept (k,) and beta > 0; got {self.coef.shape}, "
                f"{self.intercept.shape}, {self.beta}"
            )

    @property
    def n_classes(self) -> int:
        return self.coef.shape[0]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """N×D features → N×K class probabilities (float64)."""
        z = self.beta * (np.asarray(X, dtype=np.float64) @ self.coef.T + self.intercept)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def to_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "intercept": self.intercept, "beta": float(self.beta)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinearHead:
        return cls(
            np.asarray(d["coef"], dtype=np.float64), np.asarray(d["intercept"], dtype=np.float64), d["beta"]
        )
