"""Model families: scikit-learn pipelines (scaling + classifier) with a small hyper-parameter grid each.

Adding a family is one :class:`Family` entry in :data:`FAMILIES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

DECAYS = ("constant", "cosine", "square")


class SoftmaxClassifier(ClassifierMixin, BaseEstimator):
    """A linear softmax head trained with SGD in PyTorch: the course's knobs as a scikit-learn estimator.

    Parameters
    ----------
    epochs : passes over the training data (at most; early stopping may end sooner).
    lr_max : peak learning rate; ``decay`` shapes it over the epochs (``constant``, ``cosine`` or
        ``square``: ``lr_max * (1 - epoch/epochs)**2``).
    momentum, weight_decay : SGD settings.
    label_smoothing : cross-entropy label smoothing in [0, 1).
    batch_size : samples per SGD step.
    dropout : dropout on the input features during training, in [0, 1).
    validation_fraction : share of the training data held out for early stopping (0 disables it).
    patience : epochs without a better validation loss before training stops.
    random_state : seed for initialisation, shuffling and the validation split.
    """

    def __init__(
        self,
        epochs: int = 100,
        lr_max: float = 0.05,
        decay: str = "cosine",
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        label_smoothing: float = 0.0,
        batch_size: int = 64,
        dropout: float = 0.0,
        validation_fraction: float = 0.1,
        patience: int = 10,
        random_state: int | None = 0,
    ):
        self.epochs = epochs
        self.lr_max = lr_max
        self.decay = decay
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.label_smoothing = label_smoothing
        self.batch_size = batch_size
        self.dropout = dropout
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.random_state = random_state

    def _check_params(self) -> None:
        checks = [
            ("epochs", isinstance(self.epochs, int) and self.epochs >= 1, "an integer >= 1"),
            ("lr_max", self.lr_max > 0, "a number > 0"),
            ("decay", self.decay in DECAYS, f"one of {DECAYS}"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, "an integer >= 1"),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("validation_fraction", 0 <= self.validation_fraction < 1, "in [0, 1)"),
            ("patience", isinstance(self.patience, int) and self.patience >= 1, "an integer >= 1"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

    def _lr(self, epoch: int) -> float:
        t = epoch / self.epochs
        if self.decay == "cosine":
            return self.lr_max * 0.5 * (1 + math.cos(math.pi * t))
        if self.decay == "square":
            return self.lr_max * (1 - t) ** 2
        return self.lr_max

    def fit(self, X: Any, y: Any) -> SoftmaxClassifier:
        """Train on features ``X`` (n_samples × n_features) and labels ``y``."""
        import torch

        self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"SoftmaxClassifier needs samples of at least 2 classes; got {len(self.classes_)} class"
            )
        seed = 0 if self.random_state is None else int(self.random_state)
        X_tr, y_tr, X_val, y_val = X, y_idx, None, None
        if self.validation_fraction > 0 and len(X) * self.validation_fraction >= len(self.classes_):
            counts = np.bincount(y_idx)
            stratify = y_idx if counts.min() >= 2 else None
            X_tr, X_val, y_tr, y_val = train_test_split(
                X, y_idx, test_size=self.validation_fraction, random_state=seed, stratify=stratify
            )
        with torch.random.fork_rng(devices=[]):  # dropout and initialisation draw from the seeded global RNG
            torch.manual_seed(seed)
            best_state = self._train(torch, X_tr, y_tr, X_val, y_val, seed)
        layer = self.__dict__.pop("_layer")
        if best_state is not None:
            layer.load_state_dict(best_state)
        self.coef_ = layer.weight.detach().numpy().astype(np.float64)
        self.intercept_ = layer.bias.detach().numpy().astype(np.float64)
        return self

    def _train(
        self, torch: Any, X_tr: np.ndarray, y_tr: np.ndarray, X_val: Any, y_val: Any, seed: int
    ) -> Any:
        gen = torch.Generator().manual_seed(seed)
        layer = torch.nn.Linear(X_tr.shape[1], len(self.classes_))
        drop = torch.nn.Dropout(self.dropout)
        opt = torch.optim.SGD(
            layer.parameters(), lr=self.lr_max, momentum=self.momentum, weight_decay=self.weight_decay
        )
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=self.label_smoothing)
        xt, yt = torch.from_numpy(np.ascontiguousarray(X_tr)), torch.from_numpy(y_tr.astype(np.int64))
        xv = None if X_val is None else torch.from_numpy(np.ascontiguousarray(X_val))
        yv = None if y_val is None else torch.from_numpy(y_val.astype(np.int64))
        best, best_state, stale = math.inf, None, 0
        self.n_iter_ = 0
        for epoch in range(self.epochs):
            for group in opt.param_groups:
                group["lr"] = self._lr(epoch)
            layer.train()
            drop.train()
            order = torch.randperm(len(xt), generator=gen)
            for start in range(0, len(xt), self.batch_size):
                idx = order[start : start + self.batch_size]
                opt.zero_grad()
                loss_fn(layer(drop(xt[idx])), yt[idx]).backward()
                opt.step()
            self.n_iter_ = epoch + 1
            if xv is None:
                continue
            with torch.no_grad():
                val_loss = float(torch.nn.functional.cross_entropy(layer(xv), yv))
            if val_loss < best - 1e-6:
                best, stale = val_loss, 0
                best_state = {k: v.clone() for k, v in layer.state_dict().items()}
            else:
                stale += 1
                if stale >= self.patience:
                    break
        self._layer = layer
        return best_state

    def _logits(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return X @ self.coef_.T + self.intercept_

    def decision_function(self, X: Any) -> np.ndarray:
        """Class scores: n_samples × n_classes logits, or for two classes the margin of ``classes_[1]``."""
        z = self._logits(X)
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (softmax of the logits), columns in the order of ``classes_``."""
        z = self._logits(X)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each sample."""
        scores = self._logits(X)
        return self.classes_[np.argmax(scores, axis=1)]


@dataclass(frozen=True)
class Family:
    """A model family: how to build its pipeline and which parameters to search."""

    name: str
    description: str
    build: Callable[[int], Pipeline]
    grid: dict[str, list]


def _logreg(seed: int) -> Pipeline:
    clf = LogisticRegression(max_iter=300, tol=1e-3, random_state=seed)
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


def _linsvm(seed: int) -> Pipeline:
    svc = LinearSVC(dual="auto", max_iter=2000, random_state=seed)
    clf = CalibratedClassifierCV(svc, method="sigmoid", cv=3, ensemble=False)
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


def _softmax(seed: int) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("clf", SoftmaxClassifier(random_state=seed))])


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("logreg", "multinomial logistic regression", _logreg, {"clf__C": [0.01, 0.1]}),
        Family("linsvm", "linear SVM, sigmoid-calibrated", _linsvm, {"clf__estimator__C": [0.001, 0.01]}),
        Family("softmax", "softmax head (PyTorch, SGD)", _softmax, {"clf__weight_decay": [1e-4, 1e-2]}),
    )
}
