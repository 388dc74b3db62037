"""Fashion-MNIST (Debian package dataset-fashion-mnist) as image folders for the benchmarks."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def load(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images (N×28×28 uint8) and labels of ``train`` or ``t10k``."""
    prefix = "train" if split == "train" else "t10k"
    images, labels = ROOT / f"{prefix}-images-idx3-ubyte.gz", ROOT / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file():
        raise SystemExit(
            f"{images} is missing: sudo apt-get install dataset-fashion-mnist (Debian) to run this benchmark"
        )
    with gzip.open(labels) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    with gzip.open(images) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    return x, y


def write_folder(
    folder: Path,
    split: str,
    per_class: int | None,
    size: tuple[int, int] | None = None,
    fmt: str = "PNG",
    seed=0,
) -> Path:
    """Write ``per_class`` images of each class (all when None) as ``folder/<class>/<n>.<ext>``.

    ``size`` upscales (bicubic) to a photo-like size, saved as JPEG quality 90 when ``fmt`` is JPEG.
    Skips the work when the folder is already complete.
    """
    x, y = load(split)
    rng = np.random.default_rng(seed)
    ext = "jpg" if fmt == "JPEG" else "png"
    stamp = folder / ".complete"
    if stamp.is_file():
        return folder
    for c, name in enumerate(CLASSES):
        idx = np.flatnonzero(y == c)
        if per_class is not None:
            idx = np.sort(rng.choice(idx, per_class, replace=False))
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in idx:
            img = Image.fromarray(x[i])
            if size is not None:
                img = img.resize(size, Image.Resampling.BICUBIC).convert("RGB")
            img.save(folder / name / f"{i:05d}.{ext}", fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    stamp.write_text("ok")
    return folder


def jpeg_folder(workdir: Path, n: int, size: tuple[int, int] = (500, 375)) -> Path:
    """``n`` training images (``n // 10`` per class) scaled to ``size`` and saved as JPEG quality 90
    in ``workdir/fmnist_jpeg<width>_<n>``."""
    return write_folder(workdir / f"fmnist_jpeg{size[0]}_{n}", "train", n // 10, size, "JPEG")


def image_sets(
    workdir: Path, png: int = 0, jpeg: int = 0, big: int = 0, square: int = 0
) -> list[tuple[str, Path]]:
    """The benchmark image folders asked for, named: ``png`` 28x28 PNGs, ``square`` 300x300 JPEGs,
    ``jpeg`` 500x375 JPEGs and ``big`` 4032x3024 (12 MP) JPEGs, ``n // 10`` of each class (0: none
    of that kind)."""
    sets = []
    if png:
        sets.append(("fmnist-png-28", write_folder(workdir / f"fmnist_png_{png}", "train", png // 10)))
    if square:
        sets.append(("jpeg-300x300", jpeg_folder(workdir, square, (300, 300))))
    if jpeg:
        sets.append(("jpeg-500x375", jpeg_folder(workdir, jpeg)))
    if big:
        sets.append(("jpeg-4032x3024", jpeg_folder(workdir, big, (4032, 3024))))
    return sets
