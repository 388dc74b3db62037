"""Classify new images with a saved model bundle and the backbone recorded in it.

Pixels go through the same loader (:mod:`featcache.images`) and the same backbone identity as
``extract``, so a predicted image gets exactly the features it would have in a cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from featcache.bundle import DEFAULT_MODEL, ModelBundle, load_bundle
from featcache.dataset import os_reason, scan
from featcache.errors import FeatcacheError
from featcache.images import ImageSource, load_batches, load_pixels


@dataclass
class Prediction:
    """The result for one input: the best label with its probability and the top k, or an error.

    ``label`` is the display name of class folder ``folder``. ``ood_score`` says how unlike the
    training images the image is (None when the model has no such score); ``unknown`` is True
    when it is above the model's threshold or the top probability is below the predictor's
    ``min_confidence`` (None when the model can say neither).
    """

    path: str
    label: str | None = None
    folder: str | None = None
    probability: float | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    category: str | None = None
    error: str | None = None
    ood_score: float | None = None
    unknown: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON Lines record: ``path`` and ``error``, or ``label``, ``probability``, ``top_k``,
        ``category`` when the label map has one (the folder name is not part of it), and
        ``ood_score`` and ``unknown`` when the model gives them."""
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        record: dict[str, Any] = {
            "path": self.path,
            "label": self.label,
            "probability": self.probability,
            "top_k": [{"label": label, "probability": p} for label, p in self.top_k],
        }
        if self.category is not None:
            record["category"] = self.category
        if self.ood_score is not None:
            record["ood_score"] = self.ood_score
        if self.unknown is not None:
            record["unknown"] = self.unknown
        return record


def _is_single(images: Any) -> bool:
    if isinstance(images, (str, os.PathLike, Image.Image, bytes)):
        return True
    return isinstance(images, np.ndarray) and images.ndim in (2, 3)


class Predictor:
    """A fitted model plus the backbone it was fit on, ready to classify images.

    ``names`` are the display names (from the label map) in the column order of
    :meth:`predict_proba`; ``folders`` are the class folder names behind them. An image is
    ``unknown`` when its out-of-distribution score is above the model's threshold, or (when
    ``min_confidence`` is given) its top probability is below ``min_confidence``.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        device: str = "auto",
        batch_size: int = 32,
        workers: int = 2,
        engine: str = "auto",
        min_confidence: float | None = None,
        precision: str | None = None,
    ):
        if min_confidence is not None and not (
            isinstance(min_confidence, int | float) and 0 <= min_confidence <= 1
        ):
            raise FeatcacheError(f"min_confidence must be a probability in [0, 1], got {min_confidence!r}")
        self.min_confidence = min_confidence
        self.bundle = bundle
        self.identity = bundle.identity
        self.folders = bundle.folders
        self.names = bundle.names
        self.label_map = bundle.label_map
        self.feature_dtype = np.dtype(bundle.feature_dtype)
        self.batch_size = batch_size
        self.workers = workers
        self.backbone = bundle.backbone(precision, device=device, engine=engine)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike = DEFAULT_MODEL,
        device: str = "auto",
        batch_size: int = 32,
        workers: int = 2,
        engine: str = "auto",
        min_confidence: float | None = None,
        precision: str | None = None,
    ) -> Predictor:
        """Load a verified model bundle (a file, or the folder ``fit`` wrote) and build its backbone
        on ``engine`` (see :func:`featcache.backbones.build.build_backbone`), in ``precision``
        (None: the model's; see :meth:`ModelBundle.backbone`)."""
        bundle = load_bundle(path)
        return cls(bundle, device, batch_size, workers, engine, min_confidence, precision)

    def _features(self, pixels: np.ndarray) -> np.ndarray:
        # rounded through the cache dtype the model was fit on (float16 caches are mirrored)
        return self.backbone.embed(pixels).astype(self.feature_dtype).astype(np.float32)

    def embed(self, images: ImageSource | Sequence[ImageSource]) -> np.ndarray:
        """Backbone features of one image (D) or many (N×D), rounded like the cache the model saw."""
        single = _is_single(images)
        batch = [images] if single else list(images)
        prep = self.identity.preprocessing
        rows = []
        for start in range(0, len(batch), self.batch_size):
            pixels = np.stack([load_pixels(im, prep) for im in batch[start : start + self.batch_size]])
            rows.append(self._features(pixels))
        feats = np.concatenate(rows) if rows else np.zeros((0, self.identity.feature_dim), np.float32)
        return feats[0] if single else feats

    def predict_proba(self, images: ImageSource | Sequence[ImageSource]) -> np.ndarray:
        """Class probabilities, columns in the order of ``names``: a vector for one image, N×C for many."""
        single = _is_single(images)
        proba = self.bundle.predict_proba(np.atleast_2d(self.embed(images)))
        return proba[0] if single else proba

    def predict(self, images: ImageSource | Sequence[ImageSource]) -> str | list[str]:
        """The most probable class (display name) of one image, or a list for many."""
        single = _is_single(images)
        proba = np.atleast_2d(self.predict_proba(images))
        names = [self.names[i] for i in proba.argmax(axis=1)]
        return names[0] if single else names

    def ood_score(self, images: ImageSource | Sequence[ImageSource]) -> float | np.ndarray | None:
        """How unlike the training images one image (a number) or many (an array) are; above
        ``bundle.outlier.threshold`` is unknown. None when the model has no such score."""
        if self.bundle.outlier is None:
            return None
        single = _is_single(images)
        scores = self.bundle.ood_score(np.atleast_2d(self.embed(images)))
        return float(scores[0]) if single else scores

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """N×H×W×3 uint8 pixels (from :func:`featcache.images.load_pixels`) → N×K class probabilities."""
        return self.bundle.predict_proba(self._features(pixels))

    def score_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """N×H×W×3 uint8 pixels → N×K class probabilities and N out-of-distribution scores (None
        when the model has no such score)."""
        features = self._features(pixels)
        return self.bundle.predict_proba(features), self.bundle.ood_score(features)

    def prediction(
        self, path: str, proba: np.ndarray, top_k: int = 1, ood_score: float | None = None
    ) -> Prediction:
        """The :class:`Prediction` named ``path`` for one row of class probabilities (and its
        out-of-distribution score, when the model has one)."""
        order = np.argsort(-proba, kind="stable")[:top_k]
        best = self.folders[order[0]]
        unknown = None
        if ood_score is not None:
            unknown = bool(ood_score > self.bundle.outlier.threshold)
        if self.min_confidence is not None:
            unknown = bool(unknown) or bool(proba[order[0]] < self.min_confidence)
        return Prediction(
            path=path,
            label=self.names[order[0]],
            folder=best,
            probability=float(proba[order[0]]),
            top_k=[(self.names[i], float(proba[i])) for i in order],
            category=self.label_map.category(best),
            ood_score=None if ood_score is None else float(ood_score),
            unknown=unknown,
        )

    def predict_files(self, paths: Sequence[str | os.PathLike], top_k: int = 1) -> Iterator[Prediction]:
        """Predict files and folders (recursively, in a stable order), one :class:`Prediction` per image.

        A file that cannot be read yields a Prediction with ``error`` set; the others go on.
        """
        if top_k < 1:
            raise FeatcacheError(f"top_k must be >= 1, got {top_k}")
        inputs = _expand(paths)
        results: list[Prediction | None] = [
            None if error is None else Prediction(shown, error=error) for shown, _, error in inputs
        ]
        todo = [i for i, (_, _, error) in enumerate(inputs) if error is None]
        prep = self.identity.preprocessing
        batches = load_batches([inputs[i][1] for i in todo], prep, self.batch_size, self.workers)
        done = 0
        for start, loaded in zip(range(0, len(todo), self.batch_size), batches, strict=True):
            indices = todo[start : start + self.batch_size]
            good = [(i, px) for i, px in zip(indices, loaded, strict=True) if not isinstance(px, str)]
            for i, px in zip(indices, loaded, strict=True):
                if isinstance(px, str):
                    results[i] = Prediction(inputs[i][0], error=px)
            if good:
                proba, scores = self.score_pixels(np.stack([px for _, px in good]))
                for k, (row, (i, _)) in enumerate(zip(proba, good, strict=True)):
                    results[i] = self.prediction(
                        inputs[i][0], row, top_k, None if scores is None else scores[k]
                    )
            while done < len(results) and results[done] is not None:
                yield results[done]
                done += 1
        yield from results[done:]


def _expand(paths: Sequence[str | os.PathLike]) -> list[tuple[str, str, str | None]]:
    """``(shown path, real path, error)`` for every file named or found under a named folder."""
    out: list[tuple[str, str, str | None]] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            dataset = scan(p)
            for f in dataset.files:
                out.append((os.path.join(p, f.relpath), str(dataset.path(f.relpath)), None))
            for rel, reason in dataset.unreadable:
                out.append((os.path.join(p, rel), os.path.join(p, rel), reason))
        elif os.path.exists(p):
            out.append((p, p, None))
        elif os.path.lexists(p):  # a broken link, or a loop of links
            try:
                os.stat(p)
            except OSError as e:
                out.append((p, p, os_reason(e, p)))
            else:
                out.append((p, p, None))  # it appeared meanwhile: the loader will say
        else:
            out.append((p, p, "no such file or folder"))
    return out


_LOADED: dict[tuple[str, int | None, int | None], Predictor] = {}


def predict(image: ImageSource, model_path: str | os.PathLike = DEFAULT_MODEL) -> str:
    """The class display name of one image: the course platform's ``predict(image) -> str``.

    ``image`` is a NumPy H×W×3 uint8 RGB array, a path, the bytes of an image file or a PIL image.
    The model and its backbone are loaded on the first call and reused while the model file is
    unchanged.
    """
    from featcache.bundle import resolve_model_path

    path = resolve_model_path(model_path)
    st = path.stat() if path.is_file() else None
    key = (str(path.resolve()), st and st.st_mtime_ns, st and st.st_size)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = Predictor.load(path)  # a missing or damaged file raises load_bundle's error
    if not _is_single(image):
        raise FeatcacheError("predict takes one image; use featcache.Predictor for many")
    return _LOADED[key].predict(image)
