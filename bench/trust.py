"""Results to trust on real data (issue 27), measured on data built for it from Fashion-MNIST.

    python bench/trust.py [--workdir DIR] [--base 600] [--parts 1,2,3,4]

1. Imbalance: Fashion-MNIST train with classes kept at 100/100/100/40/40/20/20/10/5/5 % of
   ``--base`` images, and a held-out test set with the same shares from t10k. ``fit --class-weight
   none --select-by accuracy`` (what fit did before) against the defaults (both weightings tried,
   chosen by balanced accuracy), each scored by ``evaluate`` on the held-out set.
2. Unknown images: far out-of-distribution, scikit-learn's bundled handwritten digits (UCI, 8×8,
   upscaled to 28×28 like Fashion-MNIST) against the imbalanced model; near, two classes
   (shirt, bag) held out of a model fit on the other eight. Kept: held-out in-distribution
   images not flagged; flagged: out-of-distribution images flagged unknown.
3. Calibration: the out-of-fold ECE (15 bins) of each family fit alone on the imbalanced data,
   before and after temperature scaling.
4. Planted near-duplicates: a balanced folder of 224×224 JPEGs where 30 % of the images get two
   copies each (re-encoded at quality 75, and resized to 200×200): CV with the copies kept in one
   fold against split across folds. ``--parts 4`` runs this part alone.
5. The cost of that near-duplicate search at 10k and 60k rows (``--parts 5``).

Features come from efficientnet_lite0 (the offline pretrained weights) on the OpenVINO engine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import fashion
import numpy as np
from harness import recorded
from PIL import Image

from featcache.cache import read_cache, write_cache
from featcache.evaluate import evaluate
from featcache.extract import extract
from featcache.fit import Selection, fit
from featcache.predictor import Predictor

SHARES = dict(zip(fashion.CLASSES, [1.0, 1.0, 1.0, 0.4, 0.4, 0.2, 0.2, 0.1, 0.05, 0.05], strict=True))
NEAR_HELD_OUT = ("shirt", "bag")


def imbalanced_folder(folder: Path, split: str, base: int, seed: int = 0) -> Path:
    """``base`` × share images of each class of ``split``, as PNGs."""
    if (folder / ".complete").is_file():
        return folder
    x, y = fashion.load(split)
    rng = np.random.default_rng(seed)
    for c, name in enumerate(fashion.CLASSES):
        idx = rng.choice(np.flatnonzero(y == c), max(5, round(base * SHARES[name])), replace=False)
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in np.sort(idx):
            Image.fromarray(x[i]).save(folder / name / f"{i:05d}.png")
    (folder / ".complete").write_text("ok")
    return folder


def digits_folder(folder: Path, n: int = 500) -> Path:
    """Handwritten digits (scikit-learn's bundled copy of UCI's) as 28×28 grey PNGs, unlabelled."""
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(load_digits().images[:n]):
        pixels = (image / 16 * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((28, 28), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.png")
    return folder


def duplicated_folder(
    folder: Path, per_class: int = 100, share: float = 0.3, seed: int = 1
) -> tuple[Path, int]:  # noqa: E501
    """A balanced folder of photo-sized images (224×224 JPEGs) where ``share`` of them have two
    near-copies each: re-encoded at JPEG quality 75, and resized to 200×200 as a PNG."""
    fashion.write_folder(folder, "train", per_class, size=(224, 224), fmt="JPEG", seed=seed)
    rng = np.random.default_rng(seed)
    planted = 0
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        originals = sorted(cls.glob("[0-9]*.jpg"))
        for path in rng.choice(originals, round(share * len(originals)), replace=False):
            image = Image.open(path).convert("RGB")
            image.save(cls / f"copy-q75-{path.stem}.jpg", quality=75)
            image.resize((200, 200), Image.Resampling.BICUBIC).save(cls / f"copy-200px-{path.stem}.png")
            planted += 2
    return folder, planted


def scores(ev) -> str:
    recalls = [r["recall"] for r in ev.per_class if r["support"]]
    return (f"accuracy {100 * ev.accuracy:5.1f}  balanced {100 * np.mean(recalls):5.1f}  "
            f"macro-F1 {100 * ev.macro_f1:5.1f}  min recall {100 * min(recalls):5.1f}")  # fmt: skip


def flagged(model: Path, folder: Path) -> float:
    predictions = list(Predictor.load(model).predict_files([folder]))
    return float(np.mean([p.unknown for p in predictions if p.error is None]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--base", type=int, default=600, help="images of the largest classes")
    parser.add_argument("--parts", default="1,2,3,4", help="which parts to run, e.g. 3 or 1,2")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="featcache-trust-"))
    opts = {"backbone": "efficientnet_lite0", "engine": "openvino"}
    parts = {int(p) for p in args.parts.split(",")}
    with recorded():
        start = time.perf_counter()
        if parts & {1, 2, 3}:
            train, test = imbalanced_data(work, args.base, opts)
        if 1 in parts:
            imbalance(work)
        if 2 in parts:
            unknown_images(work, test)
        if 3 in parts:
            calibration(work)
        if 4 in parts:
            duplicates(work, opts)
        if 5 in parts:
            grouping_cost()
        print(f"\n{time.perf_counter() - start:.0f} s in all; work folder {work}")


def imbalanced_data(work: Path, base: int, opts: dict) -> tuple[Path, Path]:
    train = imbalanced_folder(work / "imb-train", "train", base)
    test = imbalanced_folder(work / "imb-test", "t10k", base // 2, seed=1)
    for folder, cache in ((train, "train.h5"), (test, "test.h5")):
        extract(folder, work / cache, **opts)
    counts = read_cache(work / "train.h5").class_counts()
    print(f"imbalanced Fashion-MNIST: {sum(counts.values())} training images, "
          f"{', '.join(f'{k} {v}' for k, v in counts.items())}")  # fmt: skip
    print(f"held-out: {len(read_cache(work / 'test.h5'))} images from t10k, same shares")
    return train, test


def imbalance(work: Path) -> None:
    print("\n1. imbalance (fit --model all --cv 5, scored on the held-out images)")
    runs = {"before: --class-weight none --select-by accuracy": ("before", Selection("none", "accuracy")),
            "after:  the defaults (auto, balanced_accuracy)": ("after", Selection())}  # fmt: skip
    for name, (folder, selection) in runs.items():
        report = fit(work / "train.h5", output=work / folder, selection=selection).report
        best = report["families"][report["best"]]
        ev = evaluate(work / "test.h5", work / folder)
        print(f"  {name}: chose {report['best']} {best['best_params']}")
        oof = (best["cv_accuracy_mean"], best["cv_balanced_accuracy_mean"], best["min_recall"])
        line = "    out of fold: accuracy {:.1f}, balanced {:.1f}, min recall {:.1f}"
        print(line.format(*(100 * v for v in oof)))
        print(f"    held out:    {scores(ev)}; covered {100 * ev.coverage:.1f} % "
              f"(accuracy there {100 * ev.covered_accuracy:.1f})")  # fmt: skip


def unknown_images(work: Path, test: Path) -> None:
    print("\n2. unknown images (threshold: 95th percentile of out-of-fold scores)")
    after = work / "after"
    if not (after / "best.joblib").is_file():
        fit(work / "train.h5", output=after)
    kept = 1 - flagged(after, test)
    far = flagged(after, digits_folder(work / "digits"))
    print(f"  far:  imbalanced model vs 500 handwritten digits: kept {100 * kept:.1f} % of held-out "
          f"Fashion-MNIST, flagged {100 * far:.1f} % of digits")  # fmt: skip
    near_model = work / "near"
    fit(without_classes(work / "train.h5", work / "near.h5", NEAR_HELD_OUT), output=near_model)
    others = [p for p in test.iterdir() if p.is_dir() and p.name not in NEAR_HELD_OUT]
    known = _linked(work / "near-in", others)
    unknown = _linked(work / "near-out", [test / name for name in NEAR_HELD_OUT])
    near_kept, near = 1 - flagged(near_model, known), flagged(near_model, unknown)
    print(f"  near: model of the other 8 classes: kept {100 * near_kept:.1f} % of held-out images of its "
          f"classes, flagged {100 * near:.1f} % of {' and '.join(NEAR_HELD_OUT)}")  # fmt: skip


def calibration(work: Path) -> None:
    print("\n3. calibration: out-of-fold ECE (15 bins) of each family, fit alone with the defaults")
    for family in ("logreg", "linsvm", "softmax"):
        report = fit(work / "train.h5", model=family, output=work / f"cal-{family}").report
        cal = report["calibration"]
        how = (
            f"temperature beta {cal['temperature_beta']:.3g}" if cal["scaled"] else "ECE <= 0.05: not scaled"
        )
        if not cal["scaled"] and cal.get("temperature_tried") is not None:
            how = f"beta {cal['temperature_tried']:.3g} would not lower it: not scaled"
        before = "softmax of its margins" if cal["margins"] else "its probabilities"
        print(f"  {family:8} ECE {cal['ece_before']:.3f} ({before}) -> {cal['ece']:.3f} ({how})")


def duplicates(work: Path, opts: dict) -> None:
    print("\n4. planted near-duplicates (fit --model logreg --cv 5)")
    dup_folder, planted = duplicated_folder(work / "dups")
    extract(dup_folder, work / "dups.h5", **opts)
    report = fit(work / "dups.h5", model="logreg", output=work / "dups-model").report
    d = report["duplicates"]
    print(f"  {len(read_cache(work / 'dups.h5'))} images, {planted} of them planted copies: "
          f"{d['rows']} images joined in {d['groups']} groups")  # fmt: skip
    if "without_grouping" in d:
        print(f"  CV balanced accuracy {100 * d['with_grouping']:.2f} % grouped, "
              f"{100 * d['without_grouping']:.2f} % with copies split across folds")  # fmt: skip


def grouping_cost(dim: int = 1280) -> None:
    """How the near-duplicate search that fit (and audit) runs grows with the rows: N² products in
    128 principal directions, each candidate checked on the full rows."""
    from featcache.duplicates import near_duplicate_groups

    print(f"\n5. cost of finding near-duplicates (blocks of products in 128 principal directions, candidates "
          f"checked in {dim}-d; float32 synthetic rows)")  # fmt: skip
    for n in (10_000, 60_000):
        X = np.abs(np.random.default_rng(0).normal(size=(n, dim))).astype(np.float32)
        start = time.perf_counter()
        near_duplicate_groups(X)
        print(f"  {n:6d} rows: {time.perf_counter() - start:6.1f} s")


def without_classes(source: Path, target: Path, dropped: tuple[str, ...]) -> Path:
    """A copy of the cache ``source`` without the rows of the class folders ``dropped``."""
    import dataclasses

    cache = read_cache(source)
    keep = np.array([c >= 0 and cache.folders[c] not in dropped for c in cache.labels])
    paths = [p for p, k in zip(cache.paths, keep, strict=True) if k]
    rows = {"features": cache.features[keep], "labels": cache.labels[keep], "sizes": cache.sizes[keep],
            "mtimes_ns": cache.mtimes_ns[keep]}  # fmt: skip
    subset = dataclasses.replace(cache, **rows, paths=paths, path=None)
    write_cache(subset, target)
    return target


def _linked(target: Path, folders: list[Path]) -> Path:
    target.mkdir(exist_ok=True)
    for f in folders:
        if not (target / f.name).exists():
            (target / f.name).symlink_to(f.resolve())
    return target


if __name__ == "__main__":
    main()
