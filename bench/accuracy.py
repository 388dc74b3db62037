"""Test accuracy of every model family on Fashion-MNIST at the course's scale.

100 training images per class (seeded choice from the 60,000) are extracted with
``efficientnet_lite0``, each family is cross-validated and fit on them, and the fitted model is
scored on the official 10,000-image test set. Needs the Debian package dataset-fashion-mnist.
Image folders and caches stay in ``--workdir`` (git-ignored), so a rerun only refits.

    python bench/accuracy.py
    python bench/accuracy.py --precision bf16     # the same with bf16 autocast extraction
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpu import cpu_line  # noqa: E402  (bench/ is the script folder)
from fashion import write_folder  # noqa: E402

from featcache.extract import extract  # noqa: E402
from featcache.fit import evaluate, fit  # noqa: E402
from featcache.models import FAMILIES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/accuracy"))
    parser.add_argument("--per-class", type=int, default=100, help="training images per class")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--cv", type=int, default=5)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="extraction precision")
    args = parser.parse_args()
    print(cpu_line(), flush=True)

    work = args.workdir
    train_dir = write_folder(work / f"train{args.per_class}", "train", args.per_class)
    test_dir = write_folder(work / "test", "t10k", None)
    caches = {}
    for name, folder in (("train", train_dir), ("test", test_dir)):
        suffix = "" if args.precision == "fp32" else f"-{args.precision}"
        caches[name] = work / f"{name}{args.per_class if name == 'train' else ''}-{args.backbone}{suffix}.h5"
        start = time.perf_counter()
        result = extract(folder, caches[name], backbone=args.backbone, precision=args.precision)
        print(f"extract {name}: {result.n_images} images ({result.n_computed} computed) "
              f"in {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip

    print(f"\nFashion-MNIST, {args.backbone} ({args.precision}), {args.per_class} training images per class, "
          f"{args.cv}-fold CV; test set of 10,000")  # fmt: skip
    print(f"{'family':8}  {'best params':28}  {'CV acc':>13}  {'test acc':>8}  {'test F1':>7}  {'fit s':>6}")
    for family in FAMILIES:
        models = work / "models" / args.precision / family
        fitted = fit(caches["train"], model=family, cv=args.cv, output=models)
        r = fitted.report["families"][family]
        scores = evaluate(caches["test"], fitted.model_path)
        params = ", ".join(f"{k.split('__')[-1]}={v}" for k, v in r["best_params"].items())
        cv_acc = f"{100 * r['cv_accuracy_mean']:.1f} ± {100 * r['cv_accuracy_std']:.1f}"
        print(f"{family:8}  {params:28}  {cv_acc:>13}  {100 * scores.accuracy:7.2f}%  "
              f"{100 * scores.macro_f1:6.2f}%  {r['fit_seconds']:6.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
