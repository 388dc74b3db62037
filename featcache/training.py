"""What the trained heads share: the class check, the held-out split, the learning-rate schedules,
early stopping and the softmax. NumPy and scikit-learn only, so the softmax head needs no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEDULES = ("constant", "cosine", "square", "onecycle")
"""``constant``; ``cosine`` down to 0; ``square``: ``(1 - t)**2``; ``onecycle``: up from a 25th for
the first 30 % of training, then cosine down."""

EpochCallback = Callable[[int], None]
"""Called with the number of epochs that passed (1 per epoch run; when early stopping ends a fit,
the epochs it saved, so that a fit always reports ``epochs`` in all)."""


def softmax_rows(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of N×K scores."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def encode_classes(estimator: Any, y: np.ndarray) -> np.ndarray:
    """Set ``estimator.classes_`` from ``y`` and return ``y`` as indices into it; a ``ValueError``
    naming the estimator when there are fewer than 2 classes."""
    estimator.classes_, y_idx = np.unique(y, return_inverse=True)
    if len(estimator.classes_) < 2:
        raise ValueError(
            f"{type(estimator).__name__} needs samples of at least 2 classes; "
            f"got {len(estimator.classes_)} class"
        )
    return y_idx


CLASS_WEIGHTS = (None, "balanced")
"""What an estimator's ``class_weight`` may be besides a dict {class: weight}: ``None`` (every
image counts the same) or ``"balanced"`` (each class weighs the same in the loss: an image of
class c counts ``n_images / (n_classes * n_c)``), as in scikit-learn."""


def valid_class_weight(class_weight: Any) -> bool:
    """Whether ``class_weight`` is one of :data:`CLASS_WEIGHTS` or a dict of non-negative weights."""
    if isinstance(class_weight, dict):
        return all(isinstance(w, int | float) and w >= 0 for w in class_weight.values())
    return class_weight in CLASS_WEIGHTS


def sample_weights(y_idx: np.ndarray, class_weight: Any, classes: np.ndarray) -> np.ndarray | None:
    """The loss weight of each row of class indices ``y_idx`` (into ``classes``) under
    ``class_weight`` (see :data:`CLASS_WEIGHTS`; a dict's missing classes weigh 1), or None when
    every row counts the same."""
    if class_weight is None:
        return None
    if isinstance(class_weight, dict):
        return np.array([float(class_weight.get(c, 1.0)) for c in classes])[y_idx]
    counts = np.bincount(y_idx, minlength=len(classes))
    per_class = len(y_idx) / (np.count_nonzero(counts) * np.maximum(counts, 1))
    return per_class[y_idx]


def validation_split(y_idx: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Row indices to train on and to hold out for early stopping (``None`` when ``fraction`` is 0 or
    too small to hold out one row per class); stratified when every class has 2 rows or more."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(y_idx))
    n_classes = int(y_idx.max()) + 1 if len(y_idx) else 0
    if fraction <= 0 or len(y_idx) * fraction < n_classes:
        return rows, None
    stratify = y_idx if np.bincount(y_idx).min() >= 2 else None
    train, val = train_test_split(rows, test_size=fraction, random_state=seed, stratify=stratify)
    return train, val


def learning_rate(schedule: str, lr_max: float, t: float) -> float:
    """The rate of ``schedule`` (one of :data:`SCHEDULES`) at ``t`` in [0, 1) of training."""
    if schedule == "constant":
        return lr_max
    if schedule == "cosine":
        return lr_max * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "square":
        return lr_max * (1 - t) ** 2
    warmup = 0.3
    if t < warmup:
        return lr_max * (1 / 25 + (1 - 1 / 25) * t / warmup)
    return lr_max * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (1 - warmup)))


@dataclass
class EarlyStopping:
    """Tracks a validation loss epoch by epoch: keeps the best state seen, and says when ``patience``
    epochs passed without a better loss."""

    patience: int
    best: float = math.inf
    stale: int = 0
    best_state: Any = field(default=None, repr=False)

    def update(self, loss: float, state: Callable[[], Any]) -> bool:
        """Record this epoch's ``loss``; keep ``state()`` when it is the best so far. Whether to stop."""
        if loss < self.best - 1e-6:
            self.best, self.stale, self.best_state = loss, 0, state()
        else:
            self.stale += 1
        return self.stale >= self.patience

    @property
    def improving(self) -> bool:
        """Whether the last epoch improved the loss."""
        return self.best_state is not None and self.stale == 0
