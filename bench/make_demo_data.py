"""Rebuild featcache's embedded demo dataset (featcache/demo_data/) from Debian's Fashion-MNIST.

    python bench/make_demo_data.py [--train 40] [--test 20] [--seed 0]

Draws a seeded sample of each class: ``--train`` images from the official training split into
``train/<class>/`` and ``--test`` from the official test split into ``test/<class>/``. Each file
is named by its index in its split, so every demo image can be traced back to the original.
Writes ``labels.json`` (display names and categories) beside them. Needs the Debian package
``dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from fashion import CLASSES, load
from PIL import Image

OUT = Path(__file__).resolve().parent.parent / "featcache" / "demo_data"

# folder -> (display name, category), in Fashion-MNIST's label order
LABELS = {
    "tshirt": ("T-shirt/top", "tops"),
    "trouser": ("Trouser", "bottoms"),
    "pullover": ("Pullover", "tops"),
    "dress": ("Dress", "dresses"),
    "coat": ("Coat", "tops"),
    "sandal": ("Sandal", "footwear"),
    "shirt": ("Shirt", "tops"),
    "sneaker": ("Sneaker", "footwear"),
    "bag": ("Bag", "bags"),
    "boot": ("Ankle boot", "footwear"),
}


def write_split(split: str, folder: Path, per_class: int, rng: np.random.Generator) -> int:
    x, y = load(split)
    for c, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True)
        for i in np.sort(rng.choice(np.flatnonzero(y == c), per_class, replace=False)):
            Image.fromarray(x[i]).save(folder / name / f"{i:05d}.png", optimize=True)
    return per_class * len(CLASSES)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=40, help="training images per class")
    ap.add_argument("--test", type=int, default=20, help="held-out images per class")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    assert list(LABELS) == CLASSES
    rng = np.random.default_rng(args.seed)
    for split in ("train", "test"):
        shutil.rmtree(OUT / split, ignore_errors=True)
    n = write_split("train", OUT / "train", args.train, rng)
    n += write_split("t10k", OUT / "test", args.test, rng)
    labels = {folder: {"name": name, "category": cat} for folder, (name, cat) in LABELS.items()}
    (OUT / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"{OUT}: {n} images, {size / 1024:.0f} KiB in all")


if __name__ == "__main__":
    main()
