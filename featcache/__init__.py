"""featcache: a folder of labelled images to a trained image classifier, through one feature cache.

The Python API (heavy libraries load on first use, so ``import featcache`` stays fast):

- ``featcache.Predictor.load(path)`` then ``.predict(images)`` / ``.predict_proba(images)``
- ``featcache.predict(image) -> str``: the course platform's contract
- ``featcache.extract.extract``, ``featcache.fit.fit``, ``featcache.fit.evaluate``: the commands
"""

from typing import Any

from featcache._version import __version__

__all__ = ["Predictor", "Prediction", "predict", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Predictor", "Prediction", "predict"):
        from featcache import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")
