"""The estimators featcache fits on pooled features, and :class:`Family`, what a model family declares.

The families are registered in :data:`featcache.families.FAMILIES`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featcache.head import LinearHead
from featcache.training import (
    CLASS_WEIGHTS,
    EarlyStopping,
    encode_classes,
    learning_rate,
    sample_weights,
    softmax_rows,
    valid_class_weight,
    validation_split,
)
from featcache.validation import check_params

if TYPE_CHECKING:
    from featcache.bundle import ModelBundle
    from featcache.cache import FeatureCache

DECAYS = ("constant", "cosine", "square")


class SoftmaxClassifier(ClassifierMixin, BaseEstimator):
    """A linear softmax head trained with SGD: the course's knobs as a scikit-learn estimator.

    The update is PyTorch's ``optim.SGD`` (momentum, weight decay) on ``nn.Linear`` with
    ``CrossEntropyLoss(label_smoothing)``, written in NumPy so that fitting needs no torch.

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
    patience : epochs without a better validation loss before training stops. When all ``epochs``
        run out while the validation loss is still improving, a ``ConvergenceWarning`` says so.
    random_state : seed for initialisation, shuffling and the validation split.
    class_weight : ``None`` or ``"balanced"``: weight the loss so that each class counts the same
        (see :data:`featcache.training.CLASS_WEIGHTS`).
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
        class_weight: str | None = None,
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
        self.class_weight = class_weight

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
            ("class_weight", valid_class_weight(self.class_weight), f"one of {CLASS_WEIGHTS} or a dict"),
        ]
        check_params(self, checks)

    def fit(self, X: Any, y: Any) -> SoftmaxClassifier:
        """Train on features ``X`` (n_samples × n_features) and labels ``y``."""
        self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        y_idx = encode_classes(self, y)
        seed = 0 if self.random_state is None else int(self.random_state)
        train, val = validation_split(y_idx, self.validation_fraction, seed)
        X_val, y_val = (None, None) if val is None else (X[val], y_idx[val])
        weights = sample_weights(y_idx, self.class_weight, self.classes_)
        self._weights = (
            (None, None) if weights is None else (weights[train], None if val is None else weights[val])
        )
        W, b, still_improving = self._train(X[train], y_idx[train], X_val, y_val, np.random.default_rng(seed))
        del self._weights
        if still_improving:
            warnings.warn(
                f"SoftmaxClassifier: the validation loss was still improving after all epochs="
                f"{self.epochs}; raise epochs (or lr_max) for a converged fit",
                ConvergenceWarning,
                stacklevel=2,
            )
        self.coef_, self.intercept_ = W.astype(np.float64), b.astype(np.float64)
        return self

    def _train(
        self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None, y_val: np.ndarray | None, rng: Any
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Run the epochs (PyTorch's ``nn.Linear`` initialisation and ``optim.SGD`` update, in NumPy);
        return the weights and bias, the best ones on the validation data when there is some, and
        whether the validation loss was still improving at the end."""
        k, d = len(self.classes_), X.shape[1]
        bound = 1 / math.sqrt(d)
        W = rng.uniform(-bound, bound, (k, d)).astype(np.float32)
        b = rng.uniform(-bound, bound, k).astype(np.float32)
        velocity = [np.zeros_like(W), np.zeros_like(b)]
        target = np.full((k, k), self.label_smoothing / k, np.float32) + np.eye(k, dtype=np.float32) * (
            1 - self.label_smoothing
        )
        stopping = EarlyStopping(self.patience)
        stopped = False
        weights, val_weights = self._weights
        mean_weight = None if weights is None else weights.mean()
        self.n_iter_ = 0
        for epoch in range(self.epochs):
            lr = learning_rate(self.decay, self.lr_max, epoch / self.epochs)
            order = rng.permutation(len(X))
            for start in range(0, len(X), self.batch_size):
                idx = order[start : start + self.batch_size]
                xb = X[idx]
                if self.dropout > 0:
                    xb = xb * (rng.random(xb.shape) >= self.dropout) / np.float32(1 - self.dropout)
                # cross-entropy with label smoothing: d(loss)/d(logits) = (softmax - target) / batch
                grad = softmax_rows(xb @ W.T + b) - target[y[idx]]
                grad /= len(idx)
                if weights is not None:  # each image's gradient times its weight over the mean weight
                    grad *= (weights[idx] / mean_weight)[:, None].astype(np.float32)
                for param, g, v in ((W, grad.T @ xb, velocity[0]), (b, grad.sum(axis=0), velocity[1])):
                    v *= self.momentum
                    v += g + self.weight_decay * param
                    param -= lr * v
            self.n_iter_ = epoch + 1
            if X_val is None:
                continue
            p = softmax_rows(X_val @ W.T + b)
            losses = -np.log(np.maximum(p[np.arange(len(y_val)), y_val], 1e-30))
            val_loss = float(np.average(losses, weights=val_weights))
            stopped = stopping.update(val_loss, lambda: (W.copy(), b.copy()))
            if stopped:
                break
        if stopping.best_state is not None:
            W, b = stopping.best_state
        return W, b, X_val is not None and not stopped

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
        return softmax_rows(self._logits(X))

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each sample."""
        scores = self._logits(X)
        return self.classes_[np.argmax(scores, axis=1)]


class LinearSVM(ClassifierMixin, BaseEstimator):
    """A linear SVM: L2-regularised squared hinge loss, one-vs-rest, like :class:`sklearn.svm.LinearSVC`.

    It minimises the same objective as ``LinearSVC(loss="squared_hinge")``, except that the
    intercept is not penalised, with the same kind of solver as liblinear's primal one (Newton
    steps on the generalised Hessian, solved by conjugate gradients). All one-vs-rest problems are
    solved together, so the work is a few large matrix products instead of one class at a time.

    Parameters
    ----------
    C : inverse regularisation strength (> 0), as in ``LinearSVC``.
    max_iter : Newton iterations at most.
    tol : stop when the average relative change of the weights falls below this.
    class_weight : ``None`` or ``"balanced"``: each image's loss is weighted so that each class
        counts the same (see :data:`featcache.training.CLASS_WEIGHTS`), in every one-vs-rest problem.
    warm_start : start from the weights of the previous fit (same classes and features), as
        scikit-learn's ``warm_start``: along a path of growing ``C``, a fraction of the iterations.
    """

    def __init__(
        self, C: float = 1.0, max_iter: int = 200, tol: float = 1e-5, class_weight: str | None = None,
        warm_start: bool = False,
    ):  # fmt: skip
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.class_weight = class_weight
        self.warm_start = warm_start

    def fit(self, X: Any, y: Any) -> LinearSVM:
        """Train on features ``X`` (n_samples × n_features) and labels ``y``."""
        from scipy.optimize import minimize

        checks = [
            ("C", isinstance(self.C, int | float) and self.C > 0, "a number > 0"),
            ("max_iter", isinstance(self.max_iter, int) and self.max_iter >= 1, "an integer >= 1"),
            ("tol", isinstance(self.tol, int | float) and self.tol > 0, "a number > 0"),
            ("class_weight", valid_class_weight(self.class_weight), f"one of {CLASS_WEIGHTS} or a dict"),
            ("warm_start", isinstance(self.warm_start, bool), "True or False"),
        ]
        check_params(self, checks)
        previous = None
        if self.warm_start and hasattr(self, "coef_"):
            previous = (self.classes_, self.coef_, self.intercept_)
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        y_idx = encode_classes(self, y)
        k = 1 if len(self.classes_) == 2 else len(self.classes_)
        targets = (y_idx == 1)[:, None] if k == 1 else y_idx[:, None] == np.arange(k)
        signs = np.where(targets, 1, -1).astype(X.dtype)
        weights = sample_weights(y_idx, self.class_weight, self.classes_)
        d, C = X.shape[1], float(self.C)
        # per-image costs: C, or C times the image's class weight
        costs = C if weights is None else (C * weights)[:, None].astype(X.dtype)
        # solved for u, w = M u (see _preconditioner), where rows outnumber features
        M, M_inverse = _preconditioner(X, float(np.mean(costs))) if len(X) >= d else (None, None)
        Xu = X if M is None else X @ M.astype(X.dtype)  # the features in u
        square = None if M is None else M @ M

        def regularised(U: np.ndarray) -> np.ndarray:  # the gradient of 0.5 |w|^2 in u
            return U if square is None else square @ U

        # theta = [u (d x k, raveled), b (k)]; the products run in the dtype of X (float32
        # features: about 3x faster than float64), the sums in float64
        def scores(theta: np.ndarray) -> np.ndarray:
            return Xu @ theta[: d * k].reshape(d, k).astype(X.dtype) + theta[d * k :].astype(X.dtype)

        def pack(U: np.ndarray, per_sample: np.ndarray, X_rows: np.ndarray = Xu) -> np.ndarray:
            grad_u = regularised(U) + (X_rows.T @ per_sample).astype(np.float64)
            return np.concatenate([grad_u.ravel(), per_sample.sum(axis=0, dtype=np.float64)])

        # the Hessian at theta involves only the images inside some class's margin (about half of
        # them near the optimum): they are copied once per Newton step, for all its CG products
        at: dict[str, Any] = {"theta": None}

        def margins(theta: np.ndarray) -> np.ndarray:
            if at["theta"] is None or not np.array_equal(at["theta"], theta):
                at.update(theta=theta.copy(), margin=signs * scores(theta), rows=None)
            return at["margin"]

        def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            U = theta[: d * k].reshape(d, k)
            slack = np.maximum(0, 1 - margins(theta))
            loss = 0.5 * float(np.vdot(U, regularised(U))) + float(np.vdot(costs * slack, slack))
            return loss, pack(U, -2 * costs * slack * signs)

        def hessian_times(theta: np.ndarray, v: np.ndarray) -> np.ndarray:
            margin = margins(theta)
            if at["rows"] is None:
                active = margin < 1
                rows = np.flatnonzero(active.any(axis=1))
                row_costs = costs if np.isscalar(costs) else costs[rows]
                at.update(rows=rows, X=Xu[rows], curvature=(2 * row_costs * active[rows]).astype(X.dtype))
            Xa = at["X"]
            V = v[: d * k].reshape(d, k)
            per_sample = at["curvature"] * (Xa @ V.astype(X.dtype) + v[d * k :].astype(X.dtype))
            return pack(v[: d * k].reshape(d, k), per_sample, Xa)

        start = np.zeros(d * k + k)
        same = previous is not None and np.array_equal(previous[0], self.classes_)
        if same and previous[1].shape == (k, d):
            W = previous[1].T if M_inverse is None else M_inverse @ previous[1].T
            start = np.concatenate([W.ravel(), previous[2]])
        result = minimize(
            loss_and_grad, start, jac=True, hessp=hessian_times, method="Newton-CG",
            options={"maxiter": self.max_iter, "xtol": self.tol},
        )  # fmt: skip
        self.n_iter_ = int(result.nit)
        if result.status == 1:  # the iteration limit; a precision loss near the optimum is no failure
            warnings.warn(
                f"LinearSVM did not converge in max_iter={self.max_iter} Newton iterations; "
                "raise max_iter or tol",
                ConvergenceWarning,
                stacklevel=2,
            )
        U = result.x[: d * k].reshape(d, k)
        self.coef_ = (U if M is None else M @ U).T.copy()
        self.intercept_ = result.x[d * k :].copy()
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Signed distances: n_samples × n_classes, or for two classes the margin of ``classes_[1]``."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        scores = X @ self.coef_.T.astype(X.dtype) + self.intercept_.astype(X.dtype)
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def predict(self, X: Any) -> np.ndarray:
        """The class with the largest score for each sample."""
        scores = self.decision_function(X)
        index = (scores > 0).astype(int) if scores.ndim == 1 else np.argmax(scores, axis=1)
        return self.classes_[index]


PRECONDITION_SHARE = 0.05
"""The share of images taken to be inside a margin when preconditioning (bench: 0.03-0.1 do as well)."""


def _preconditioner(X: np.ndarray, cost: float) -> tuple[np.ndarray, np.ndarray]:
    """``M = (I + a G)^(-1/2)`` and its inverse, with ``G`` the second moment of ``X``'s rows and
    ``a = 2 cost n share``: the squared hinge's Hessian in w is ``I + 2 C sum x x^T`` over the images
    inside a margin, so in u (w = M u) it is near the identity, and Newton-CG's conjugate gradients
    take about half the products. Any M has the same optimum."""
    gram = (X.T @ X).astype(np.float64) / len(X)
    eigenvalues, vectors = np.linalg.eigh(gram)
    scale = 1 + 2 * cost * len(X) * PRECONDITION_SHARE * np.maximum(eigenvalues, 0)
    return (vectors * scale**-0.5) @ vectors.T, (vectors * scale**0.5) @ vectors.T


def class_logits(estimator: Any, X: Any) -> np.ndarray:
    """N×K scores of a fitted linear classifier whose softmax is its probabilities (for a
    probabilistic one) or its calibration's input (for a margin one): ``decision_function``, with
    two classes' single margin m as (0, m)."""
    z = np.asarray(estimator.decision_function(X), dtype=np.float64)
    return np.column_stack([np.zeros(len(z)), z]) if z.ndim == 1 else z


class TemperatureScaled(ClassifierMixin, BaseEstimator):
    """A classifier whose probabilities are ``softmax(beta * logits)`` of ``estimator``'s logits (see
    :func:`class_logits`): temperature scaling, with ``beta`` learnt beforehand on held-out logits
    (:func:`featcache.calibration.fit_temperature`). It predicts what ``estimator`` predicts.

    Parameters
    ----------
    estimator : a linear classifier (anything with ``decision_function``).
    beta : the inverse temperature, > 0.
    """

    def __init__(self, estimator: Any = None, beta: float = 1.0):
        self.estimator = estimator
        self.beta = beta

    def fit(self, X: Any, y: Any, **fit_params: Any) -> TemperatureScaled:
        """Fit a clone of ``estimator`` on ``X``, ``y`` (``fit_params`` go to its fit)."""
        check_params(self, [("beta", isinstance(self.beta, int | float) and self.beta > 0, "a number > 0")])
        return self._fitted(clone(self.estimator).fit(X, y, **fit_params))

    def _fitted(self, estimator: Any) -> TemperatureScaled:
        self.estimator_, self.classes_ = estimator, estimator.classes_
        if hasattr(estimator, "n_features_in_"):
            self.n_features_in_ = estimator.n_features_in_
        return self

    @classmethod
    def prefit(cls, estimator: Any, beta: float) -> TemperatureScaled:
        """The already fitted ``estimator`` with its temperature set."""
        return cls(estimator, beta)._fitted(estimator)

    def decision_function(self, X: Any) -> np.ndarray:
        """The scaled logits, N×K."""
        check_is_fitted(self)
        return self.beta * class_logits(self.estimator_, X)

    def predict_proba(self, X: Any) -> np.ndarray:
        return softmax_rows(self.decision_function(X))

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]


@dataclass(frozen=True)
class Family:
    """A model family: how to build its pipeline, which parameters to search, what it takes from a
    feature cache and what it leaves in a model bundle.

    ``calibrate`` families score classes with margins, not probabilities: the model ``fit`` saves
    is always temperature-scaled (:class:`TemperatureScaled`, learnt on the out-of-fold margins);
    the others are when their out-of-fold probabilities are poorly calibrated. Temperature
    scaling cannot change which class scores highest, so the saved model predicts exactly what
    was cross-validated. ``blas_threads`` caps the BLAS threads of its
    fits (None: the library's default). ``epochs`` is how many epochs one fit reports through
    the ``clf__on_epoch`` fit parameter (0: the family reports none). ``scores_outliers``: its
    model is saved with an out-of-distribution score on the cache's pooled features (what it
    predicts from; not so for a family whose network changes them). ``warm_start`` names the grid
    parameter along which a fold's fits start from the previous solution (ascending; the
    classifier takes ``warm_start=True``), None when they all start from scratch. ``one_fit``
    names a grid parameter whose settings one fit yields at once (fit with the first, then only
    set to the others, as :class:`~featcache.finetune.FinetuneClassifier`'s ``keep``).

    This base class fits the pooled features of a cache; a family that takes something else
    overrides :meth:`unavailable`, :meth:`inputs`, :meth:`to_bundle` and :meth:`prepare`.
    """

    name: str
    description: str
    build: Callable[[int], Pipeline]
    grid: dict[str, list]
    calibrate: bool = False
    blas_threads: int | None = None
    epochs: int = 0
    scores_outliers: bool = True
    warm_start: str | None = None
    one_fit: str | None = None

    def build_final(self, seed: int, params: dict[str, Any], beta: float | None = None) -> Pipeline:
        """The pipeline to refit on all data and save: ``build`` with ``params``, its classifier
        temperature-scaled by ``beta`` when one is given."""
        pipe = self.build(seed).set_params(**params)
        if beta is not None:
            name, clf = pipe.steps[-1]
            pipe.steps[-1] = (name, TemperatureScaled(clf, beta))
        return pipe

    def unavailable(self, cache: FeatureCache) -> str | None:
        """Why this family cannot fit ``cache`` (a message for the user), or None when it can."""
        return None

    def inputs(self, cache: FeatureCache, paths: Any = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """The rows this family fits on (the labelled ones, of ``paths`` only when given), their class
        folders, and the pipeline parameters that every fit on ``cache`` sets (not searched)."""
        X, y = cache.labelled(paths)
        return X, y, {}

    def to_bundle(self, final: Pipeline, cache: FeatureCache, X: np.ndarray, report: dict) -> ModelBundle:
        """The bundle of ``final``, fitted on the rows ``X`` of ``cache``."""
        from featcache.bundle import ModelBundle

        return ModelBundle.with_pipeline(
            final,
            family=self.name,
            folders=[str(c) for c in final.classes_],
            identity=cache.identity,
            label_map=cache.label_map,
            feature_dtype=cache.dtype,
            head=linear_head(final, X),
            report=report,
        )

    def prepare(self, bundle: ModelBundle) -> None:
        """Get what predicting with ``bundle`` needs ready on this machine (nothing, by default)."""


def logreg(seed: int) -> Pipeline:
    clf = LogisticRegression(max_iter=300, tol=1e-3, random_state=seed)
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


def linsvm(seed: int) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("clf", LinearSVM())])


def softmax(seed: int) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("clf", SoftmaxClassifier(random_state=seed))])


def linear_head(pipeline: Pipeline, X: np.ndarray, atol: float = 1e-5) -> LinearHead | None:
    """The :class:`LinearHead` of a fitted scaler + linear classifier pipeline (temperature-scaled or
    not), when its probabilities on ``X`` equal the pipeline's within ``atol``; else None."""
    if len(pipeline.steps) != 2 or not isinstance(pipeline.steps[0][1], StandardScaler):
        return None
    scaler, clf = pipeline.steps[0][1], pipeline.steps[1][1]
    beta = 1.0
    if isinstance(clf, TemperatureScaled):
        beta, clf = float(clf.beta), clf.estimator_
    if not isinstance(clf, (LogisticRegression, LinearSVM, SoftmaxClassifier)):
        return None
    coef, intercept = np.asarray(clf.coef_, np.float64), np.asarray(clf.intercept_, np.float64)
    if coef.shape[0] == 1:  # two classes, one margin m: logits (0, m)
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([np.zeros(1), intercept])
    mean = scaler.mean_ if scaler.mean_ is not None else np.zeros(coef.shape[1])
    scale = scaler.scale_ if scaler.scale_ is not None else np.ones(coef.shape[1])
    coef = coef / scale
    head = LinearHead(coef, intercept - coef @ mean, beta)
    expected = pipeline.predict_proba(X)
    if head.n_classes != expected.shape[1]:
        return None
    if not np.allclose(head.predict_proba(X), expected, rtol=0, atol=atol):
        return None
    return head
