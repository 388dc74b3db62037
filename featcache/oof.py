"""The out-of-fold predictions ``fit`` keeps beside the model (``oof.npz``): for every labelled
image, the class probabilities of a model that did not see it. The calibration diagram and the
audit of label errors read them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError
from featcache.files import replaced_atomically

OOF_FILE = "oof.npz"
"""What ``fit`` keeps beside the model: every labelled image's out-of-fold class probabilities."""


def save_oof(
    path: Path, paths: list[str], truth: np.ndarray, folders: list[str], proba: np.ndarray,
    ood_scores: np.ndarray | None,
) -> Path:  # fmt: skip
    """Write ``oof.npz``: ``paths`` (relative to the cache's folder), their class folder ``truth``,
    the class ``folders`` in column order, the out-of-fold ``probabilities`` (calibrated as the
    saved model is) and, when the model has one, the out-of-fold ``ood_score`` of each image."""
    arrays = {"paths": np.array(paths, dtype=str), "truth": np.asarray(truth, dtype=str),
              "folders": np.array(folders, dtype=str), "probabilities": proba.astype(np.float32)}  # fmt: skip
    if ood_scores is not None:
        arrays["ood_score"] = ood_scores.astype(np.float32)
    with replaced_atomically(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return path


def load_oof(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays :func:`save_oof` wrote (``path``: the file, or the folder ``fit`` wrote)."""
    path = Path(path)
    path = path / OOF_FILE if path.is_dir() else path
    if not path.is_file():
        raise FeatcacheError(
            f"{path}: no out-of-fold predictions there (fit writes {OOF_FILE} beside the model)"
        )
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
