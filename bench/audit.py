"""How well ``featcache audit`` finds planted problems, and what it costs (issue 28).

    python bench/audit.py [--workdir DIR] [--parts 1,2,3,4,5] [--full CACHE]

1. Label errors: 6,000 Fashion-MNIST training images (600 per class, 28×28 PNGs), 5 % of them
   (seeded) written into a wrong class folder. Extract (efficientnet_lite0, OpenVINO), ``fit
   --model logreg``, ``audit``: precision and recall of the moved images among the first k label
   issues, k = the number moved and 2k; with fit's out-of-fold probabilities and with those audit
   computes itself (no model).
2. Leaks and the threshold: a test folder of 2,000 clean t10k images, 20 byte-identical copies of
   training images and 20 near copies (cropped by 5 %, resized by ±10 %, saved as JPEG quality
   70); a. on part 1's 28×28 PNGs, b. on 2,000 training and 2,000 test images upscaled to
   224×224 JPEGs (the size of a photo's copy). ``audit --against``: how many copies it finds,
   and how many clean test images it calls a leak; the similarity of each planted copy to its
   original, and of each clean test image to its most similar training image (what the default
   threshold must separate).
3. Cost: one ``featcache audit --json`` run (a process of its own: wall time and peak memory) on
   the features of 10,000 and of all 60,000 Fashion-MNIST training images, out-of-fold
   probabilities computed (no model). ``--full CACHE`` takes an existing cache of the 60,000
   (efficientnet_lite0) instead of extracting it.
4. Which change a near-duplicate survives (``--parts 4``): the similarity of 30 of part 2b's
   training images to each change alone.
5. Imbalanced and noisy (``--parts 5``): bench/trust.py's imbalanced folder, 5 % of the labels
   moved in the cache; label issues with the audit's logistic regression unweighted and
   class-weighted (what it does on imbalanced classes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fashion
import numpy as np
from harness import recorded
from PIL import Image

from featcache.audit import audit
from featcache.cache import read_cache, write_cache
from featcache.duplicates import SIMILARITY
from featcache.extract import extract
from featcache.fit import fit
from featcache.outliers import unit_rows

OPTS = {"backbone": "efficientnet_lite0", "engine": "openvino"}


def noisy_folder(folder: Path, per_class: int = 600, share: float = 0.05, seed: int = 0) -> dict[str, str]:
    """``per_class`` training images of each class, ``share`` of them in a wrong folder; returns
    moved path -> true class."""
    x, y = fashion.load("train")
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(10)])
    moved = set(rng.choice(idx, round(share * len(idx)), replace=False).tolist())
    truth = {}
    for i in idx:
        c = int(y[i])
        if i in moved:
            c = (c + 1 + int(rng.integers(0, 9))) % 10
        path = f"{fashion.CLASSES[c]}/{i:05d}.png"
        if i in moved:
            truth[path] = fashion.CLASSES[y[i]]
        if not (folder / path).is_file():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(folder / path)
    return truth


def label_errors(work: Path) -> tuple[Path, Path]:
    folder = work / "noisy"
    truth = noisy_folder(folder)
    cache = work / "noisy.h5"
    extract(folder, cache, **OPTS)
    fit(cache, model="logreg", output=work / "noisy-model")
    moved = len(truth)
    print(f"1. label errors: {len(read_cache(cache))} images, {moved} moved into a wrong class folder")
    print(
        f"   {'probabilities':<40} {'issues':>6} {'P@k':>6} {'R@k':>6} {'P@2k':>6} {'R@2k':>6} {'seconds':>7}"
    )
    for name, model in (
        ("fit's (logreg, oof.npz)", work / "noisy-model"),
        ("computed by audit (no model)", None),
    ):
        start = time.perf_counter()
        result = audit(cache, model_path=model)
        seconds = time.perf_counter() - start
        ranked = [issue.path for issue in result.label_issues]
        cells = []
        for k in (moved, 2 * moved):
            hits = len(set(ranked[:k]) & set(truth))
            cells += [hits / max(1, min(k, len(ranked))), hits / moved]
        right = sum(issue.suggested == truth.get(issue.path) for issue in result.label_issues[:moved])
        print(f"   {name:<40} {len(ranked):>6} " + " ".join(f"{c:6.3f}" for c in cells) + f" {seconds:7.1f}")
        print(f"   {'':<40} suggested label right for {right} of the first {moved}")
    return folder, cache


def copy_of(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Cropped by 5 % (2.5 % each side), resized by ±10 %, for a JPEG at quality 70."""
    w, h = img.size
    dx, dy = round(0.025 * w), round(0.025 * h)
    cropped = img.crop((dx, dy, w - dx, h - dy))
    scale = 1 + (0.1 if rng.random() < 0.5 else -0.1)
    return cropped.resize(
        (round(cropped.width * scale), round(cropped.height * scale)), Image.Resampling.BICUBIC
    )


def photo_folder(folder: Path, split: str, per_class: int, seed: int) -> Path:
    """``per_class`` images of each class of ``split``, upscaled to 224×224 and saved as JPEG
    quality 90 (photo-sized copies of a photo, not of a 28-pixel thumbnail)."""
    x, y = fashion.load(split)
    rng = np.random.default_rng(seed)
    for c, name in enumerate(fashion.CLASSES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in rng.choice(np.flatnonzero(y == c), per_class, replace=False):
            path = folder / name / f"{split[0]}{i:05d}.jpg"
            if not path.is_file():
                img = Image.fromarray(x[i]).resize((224, 224), Image.Resampling.BICUBIC).convert("RGB")
                img.save(path, "JPEG", quality=90)
    return folder


def leaks(title: str, train_folder: Path, train_cache: Path, test_folder: Path) -> None:
    """Plant 20 exact and 20 near copies of training images into ``test_folder`` (its clean
    images already there), extract it, and audit ``train_cache`` against it."""
    rng = np.random.default_rng(1)
    train = read_cache(train_cache)
    clean = [
        f for f in sorted(test_folder.rglob("*")) if f.is_file() and not f.stem.startswith(("exact", "near"))
    ]
    planted = {}
    for n, k in enumerate(rng.choice(len(train), 40, replace=False)):
        source, kind = train_folder / train.paths[k], "exact" if n < 20 else "near"
        target = (
            test_folder
            / train.paths[k].split("/")[0]
            / f"{kind}{n:02d}{source.suffix if kind == 'exact' else '.jpg'}"
        )
        if kind == "exact":
            target.write_bytes(source.read_bytes())
        else:
            copy_of(Image.open(source).convert("RGB"), rng).save(target, "JPEG", quality=70)
        planted[str(target.relative_to(test_folder))] = train.paths[k]
    test_cache = test_folder.parent / f"{test_folder.name}.h5"
    extract(test_folder, test_cache, **OPTS)
    result = audit(train_cache, against=test_cache, outliers=0)
    found = {leak.path: leak for leak in result.leaks}
    exact = [p for p in planted if p.split("/")[1].startswith("exact")]
    near = [p for p in planted if p.split("/")[1].startswith("near")]
    false = [p for p in found if p not in planted]
    print(f"\n2{title}: {len(clean)} clean test images + {len(exact)} exact and {len(near)} near copies "
          f"of training images ({len(train)}); threshold {SIMILARITY}")  # fmt: skip
    n_exact, n_near = sum(p in found for p in exact), sum(p in found for p in near)
    mismatched = sum(found[p].train_path != planted[p] for p in planted if p in found)
    print(f"   found: exact {n_exact}/{len(exact)}, near {n_near}/{len(near)}; matched to another training "
          f"image: {mismatched}; clean test images called leaks: {len(false)} of {len(clean)}")  # fmt: skip
    for p in false[:5]:
        print(f"     {p} ~ {found[p].train_path} ({found[p].similarity:.3f})")
    test = read_cache(test_cache)
    U, T = unit_rows(train.features), unit_rows(test.features)
    row, trow = {p: i for i, p in enumerate(train.paths)}, {p: i for i, p in enumerate(test.paths)}
    copies = np.array([T[trow[p]] @ U[row[planted[p]]] for p in near])
    best = (T[[trow[str(f.relative_to(test_folder))] for f in clean]] @ U.T).max(axis=1)
    print(f"   similarity of the near copies to their original: min {copies.min():.4f}, "
          f"median {np.median(copies):.4f}")  # fmt: skip
    print(f"   clean test image to its most similar training image: median {np.median(best):.4f}, "
          f"99th percentile {np.quantile(best, 0.99):.4f}, max {best.max():.4f}")  # fmt: skip
    for t in (0.9, 0.95, 0.97, 0.98, 0.99):
        print(f"     at {t}: near copies found {int((copies >= t).sum())}/{len(near)}, "
              f"clean images above {int((best >= t).sum())}")  # fmt: skip
    same = []
    for c in range(len(train.folders)):
        rows = U[train.labels == c]
        sims = rows @ rows.T
        np.fill_diagonal(sims, -1)
        same.append(sims.max(axis=1))
    same = np.concatenate(same)
    print("   training image to its most similar other training image of its class: "
          f"median {np.median(same):.4f}, 99.9th percentile {np.quantile(same, 0.999):.4f}; "
          f"{int((same >= SIMILARITY).sum())} at or above {SIMILARITY}")  # fmt: skip


def test_folder(folder: Path, n: int = 2000) -> Path:
    """``n`` t10k images as 28×28 PNGs under their class folders."""
    x, y = fashion.load("t10k")
    for i in np.random.default_rng(1).choice(len(y), n, replace=False):
        path = folder / fashion.CLASSES[y[i]] / f"t{i:05d}.png"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(path)
    return folder


def each_change(work: Path) -> None:
    """The similarity of 30 of part 2b's training images to each change alone."""
    photos = photo_folder(work / "photos", "train", 200, 0)
    extract(photos, work / "photos.h5", **OPTS)
    train = read_cache(work / "photos.h5")
    picked = np.random.default_rng(3).choice(len(train), 30, replace=False)

    def crop(img: Image.Image, share: float, centred: bool = True) -> Image.Image:
        w, h = img.size
        dx, dy = round(share * w / (2 if centred else 1)), round(share * h / (2 if centred else 1))
        return img.crop((dx, dy, w - dx, h - dy) if centred else (dx, dy, w, h))

    changes = {
        "JPEG quality 70": lambda im: im,
        "resized -10 %": lambda im: im.resize((202, 202), Image.Resampling.BICUBIC),
        "resized +10 %": lambda im: im.resize((246, 246), Image.Resampling.BICUBIC),
        "cropped 2 % (centred)": lambda im: crop(im, 0.02),
        "cropped 5 % (centred)": lambda im: crop(im, 0.05),
        "cropped 5 % (one corner)": lambda im: crop(im, 0.05, centred=False),
    }
    folder = work / "changes"
    for n, change in enumerate(changes.values()):
        for k in picked:
            target = folder / f"c{n}" / train.paths[k].split("/")[0] / Path(train.paths[k]).name
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                image = change(Image.open(Path(train.data_root) / train.paths[k]).convert("RGB"))
                image.save(target, "JPEG", quality=70 if n == 0 else 95)
    extract(folder, work / "changes.h5", **OPTS)
    changed = read_cache(work / "changes.h5")
    U, V = unit_rows(train.features), unit_rows(changed.features)
    row = {p: i for i, p in enumerate(train.paths)}
    print(
        "\n4. each change alone, 30 of part 2b's 224×224 training images (other changes saved at quality 95)"
    )
    print(f"   {'change':<26} {'min':>6} {'median':>6}  found at {SIMILARITY}")
    for n, name in enumerate(changes):
        sims = np.array([V[i] @ U[row[p.split("/", 1)[1]]] for i, p in enumerate(changed.paths)
                         if p.startswith(f"c{n}/")])  # fmt: skip
        found = int((sims >= SIMILARITY).sum())
        print(f"   {name:<26} {sims.min():6.3f} {np.median(sims):6.3f}  {found}/{len(sims)}")


def imbalanced_noise(work: Path) -> None:
    """bench/trust.py's imbalanced Fashion-MNIST (classes at 5–100 % of 600) with 5 % of the
    labels moved to another class in the cache: label issues with the audit's logistic
    regression unweighted and class-weighted."""
    from trust import imbalanced_folder

    from featcache.audit import label_issues, out_of_fold_probabilities

    cache = work / "imbalanced.h5"
    extract(imbalanced_folder(work / "imb-train", "train", 600), cache, **OPTS)
    data = read_cache(cache)
    rng = np.random.default_rng(0)
    moved = rng.choice(len(data), round(0.05 * len(data)), replace=False)
    labels = data.labels.copy()
    labels[moved] = (labels[moved] + 1 + rng.integers(0, 9, len(moved))) % 10
    given = np.array(data.folders)[labels]
    wrong = {data.paths[i] for i in moved}
    counts = np.bincount(labels, minlength=10)
    print(f"\n5. imbalanced: {len(data)} images ({counts.min()} to {counts.max()} per class), "
          f"{len(moved)} labels moved to another class; the audit's own logistic regression")  # fmt: skip
    header = f"{'weighting':<12} {'issues':>6} {'P@k':>6} {'R@2k':>6}"
    print(f"   {header}  issues in the 2 smallest classes (their images)")
    small = np.argsort(counts)[:2]
    for balanced in (False, True):
        proba = out_of_fold_probabilities(data.features, labels, balanced=balanced)
        issues = label_issues(proba, given, data.folders, data.paths)
        ranked = [issue.path for issue in issues]
        k = len(moved)
        in_small = sum(issue.given in {data.folders[c] for c in small} for issue in issues)
        print(f"   {'balanced' if balanced else 'none':<12} {len(ranked):>6} "
              f"{len(set(ranked[:k]) & wrong) / k:6.3f} {len(set(ranked[: 2 * k]) & wrong) / k:6.3f}  "
              f"{in_small} ({counts[small].sum()})")  # fmt: skip


def subset(source: Path, target: Path, n: int) -> Path:
    """The first ``n`` rows of each tenth of ``source`` (a class-balanced subset), as a cache."""
    cache = read_cache(source)
    keep = np.zeros(len(cache), bool)
    for c in range(len(cache.folders)):
        keep[np.flatnonzero(cache.labels == c)[: n // len(cache.folders)]] = True
    rows = {"features": cache.features[keep], "labels": cache.labels[keep], "sizes": cache.sizes[keep],
            "mtimes_ns": cache.mtimes_ns[keep]}  # fmt: skip
    paths = [p for p, k in zip(cache.paths, keep, strict=True) if k]
    write_cache(dataclasses.replace(cache, **rows, paths=paths, path=None), target)
    return target


def timed_audit(cache: Path, cwd: Path) -> tuple[float, float, list[str]]:
    """Wall seconds and peak memory (MiB) of ``featcache audit CACHE --json`` in a process of its own."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "featcache", "audit", str(cache), "--json"], cwd=cwd,
                         capture_output=True, text=True, check=True)  # fmt: skip
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    kinds = [json.loads(line)["kind"] for line in run.stdout.splitlines()]
    return seconds, max(peak, before) / 1024, kinds


def cost(work: Path, full: Path | None) -> None:
    if full is None:
        full = work / "fmnist60k.h5"
        extract(fashion.write_folder(work / "fmnist60k", "train", None), full, **OPTS)
    print("\n3. cost of one audit (a process of its own; out-of-fold probabilities computed, no model)")
    print(f"   {'rows':>6} {'seconds':>8} {'peak MiB':>9}  findings")
    for n in (10_000, 60_000):
        cache = full if n == 60_000 else subset(full, work / f"fmnist{n // 1000}k.h5", n)
        seconds, peak, kinds = timed_audit(cache, work)
        summary = ", ".join(f"{k} {kinds.count(k)}" for k in sorted(set(kinds)))
        print(f"   {len(read_cache(cache)):>6} {seconds:8.1f} {peak:9.0f}  {summary}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--parts", default="1,2,3", help="which parts to run, e.g. 3 or 1,2")
    parser.add_argument(
        "--full", type=Path, default=None, help="a cache of all 60,000 training images (efficientnet_lite0)"
    )
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="featcache-audit-"))
    work.mkdir(parents=True, exist_ok=True)
    parts = {int(p) for p in args.parts.split(",")}
    with recorded():
        if parts & {1, 2}:
            folder, cache = label_errors(work)
            if 2 in parts:
                leaks("a. 28×28 PNGs (the data of part 1)", folder, cache, test_folder(work / "test"))
                photos = photo_folder(work / "photos", "train", 200, 0)
                extract(photos, work / "photos.h5", **OPTS)
                leaks(
                    "b. 224×224 JPEGs",
                    photos,
                    work / "photos.h5",
                    photo_folder(work / "photos-test", "t10k", 200, 1),
                )
        if 3 in parts:
            cost(work, args.full)
        if 4 in parts:
            each_change(work)
        if 5 in parts:
            imbalanced_noise(work)


if __name__ == "__main__":
    main()
