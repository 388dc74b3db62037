"""Test accuracy on Fashion-MNIST at the course's scale: backbone x layers x model family.

100 training images per class (seeded choice from the 60,000) are extracted once per backbone
with every layer it has (``--layers 0,1,...,last``); the features of any layer set are columns of
that extraction (the test suite checks that they equal a separate ``--layers`` extraction), so
each set is written as its own cache and fit (CV on the training images only) and scored on
the official 10,000-image test set. Extraction speed is measured apart: ``extract`` of 500
images with the set's own ``--layers``, the second of two runs (the first converts the model).
Needs the Debian package dataset-fashion-mnist. Folders and caches stay in ``--workdir``
(git-ignored), so a rerun only refits.

``--maps 4,5`` adds ``finetune`` rows: for each stage, train and test caches that keep its
maps (``extract --maps``), ``fit --model finetune`` on the training maps (CV picks the setting),
scored on the test cache's maps; with the fit time (CV and refit) and the cache per image.

    python bench/accuracy.py                                    # Lite0/1/2 x last/multi x 3 families
    python bench/accuracy.py --search --backbones efficientnet_lite0 --families logreg
    python bench/accuracy.py --precision bf16     # or int8 (OpenVINO, NNCF)
    python bench/accuracy.py --maps 4,5   # + fine-tuning rows for Lite0 (--finetune-backbones)
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from fashion import write_folder
from harness import recorded

from featcache.backbones import get_entry
from featcache.backbones.entry import split_layers
from featcache.cache import read_cache, write_cache
from featcache.extract import extract
from featcache.fit import evaluate, fit

LADDER = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"
SEARCH = [
    "last", "6,last", "5,6,last", "4,5,6,last", "3,4,5,6,last", "2,3,4,5,6,last", "1,2,3,4,5,6,last",
    "0,1,2,3,4,5,6,last", "4,5,6", "2,3,4,5,6",
]  # fmt: skip


def columns(entry, everything: str, layers: str) -> list[int]:
    """Which columns of the all-layers features (avg-pooled) make up the features of ``layers``."""
    starts, at = {}, 0
    stages, last = split_layers(everything)
    for i in stages:
        starts[i] = (at, at + entry.stages[i].channels)
        at += entry.stages[i].channels
    starts["last"] = (at, at + entry.feature_dim)
    wanted, with_last = split_layers(layers)
    return [c for key in [*wanted, *(["last"] if with_last else [])] for c in range(*starts[key])]


def sliced(source: Path, target: Path, entry, everything: str, layers: str) -> Path:
    if target.is_file():
        return target
    cache = read_cache(source)
    cols = columns(entry, everything, layers)
    cache.identity = dataclasses.replace(cache.identity, layers=layers, feature_dim=len(cols))
    cache.features = cache.features[:, cols]
    target.parent.mkdir(parents=True, exist_ok=True)
    write_cache(cache, target)
    return target


def speed(
    folder: Path, work: Path, backbone: str, layers: str, precision: str, maps: int | None = None
) -> float:
    out = work / "speed.h5"
    for _ in range(2):
        result = extract(folder, out, backbone=backbone, layers=layers, maps=maps, precision=precision,
                         overwrite=True)  # fmt: skip
    return result.n_images / result.seconds


def per_image_kib(cache: Path) -> float:
    """Bytes of the cache file per image, in KiB."""
    return cache.stat().st_size / len(read_cache(cache)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/accuracy"))
    parser.add_argument("--per-class", type=int, default=100, help="training images per class")
    parser.add_argument("--backbones", default=LADDER, help="comma-separated backbone names")
    parser.add_argument("--layers", default="last;multi", help="layer sets, separated by ';'")
    parser.add_argument("--search", action="store_true", help=f"compare the layer sets {SEARCH}")
    parser.add_argument("--families", default="logreg,linsvm,softmax")
    parser.add_argument("--no-speed", action="store_true", help="skip the extraction speed runs")
    parser.add_argument("--cv", type=int, default=5)
    parser.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16", "int8"], help="extraction precision"
    )
    parser.add_argument("--maps", default="", help="stages to fine-tune above (comma-separated), e.g. 4,5")
    parser.add_argument(
        "--finetune-backbones", default="efficientnet_lite0", help="backbones --maps applies to"
    )
    args = parser.parse_args()

    work = args.workdir
    train_dir = write_folder(work / f"train{args.per_class}", "train", args.per_class)
    test_dir = write_folder(work / "test", "t10k", None)
    speed_dir = write_folder(work / "speed", "train", 50, seed=1)
    layer_sets = SEARCH if args.search else args.layers.split(";")
    suffix = "" if args.precision == "fp32" else f"-{args.precision}"
    rows = []
    for backbone in args.backbones.split(","):
        entry = get_entry(backbone)
        everything = entry.resolve_layers(",".join([*map(str, range(len(entry.stages))), "last"]))
        caches = {}
        for name, folder in (("train", train_dir), ("test", test_dir)):
            caches[name] = (
                work / f"{name}{args.per_class if name == 'train' else ''}-{backbone}-all{suffix}.h5"
            )
            result = extract(
                folder, caches[name], backbone=backbone, layers=everything, precision=args.precision
            )
            print(f"extract {backbone} {name}: {result.n_images} images ({result.n_computed} computed) "
                  f"in {result.seconds:.0f} s", flush=True)  # fmt: skip
        for spec in layer_sets:
            layers = entry.resolve_layers(spec)
            shown = f"multi = {layers}" if spec == "multi" else layers
            img_s = (
                float("nan") if args.no_speed else speed(speed_dir, work, backbone, layers, args.precision)
            )
            tag = f"{backbone}-{layers.replace(',', '_')}{suffix}"
            train = sliced(caches["train"], work / "sliced" / f"train-{tag}.h5", entry, everything, layers)
            test = sliced(caches["test"], work / "sliced" / f"test-{tag}.h5", entry, everything, layers)
            dim = read_cache(train).identity.feature_dim
            kib = per_image_kib(train)
            for family in args.families.split(","):
                rows.append(scored(train, test, family, args.cv, work / "models" / tag / family,
                                   (backbone, shown, dim), img_s, kib))  # fmt: skip
        stages = [int(s) for s in args.maps.split(",") if s]
        for stage in stages if backbone in args.finetune_backbones.split(",") else []:
            c, h, w = entry.maps_shape(stage)
            caches = {}
            for name, folder in (("train", train_dir), ("test", test_dir)):
                caches[name] = (
                    work
                    / f"{name}{args.per_class if name == 'train' else ''}-{backbone}-maps{stage}{suffix}.h5"
                )
                result = extract(
                    folder, caches[name], backbone=backbone, maps=stage, precision=args.precision
                )
                print(f"extract {backbone} {name} maps {stage}: {result.n_images} images "
                      f"({result.n_computed} computed) in {result.seconds:.0f} s", flush=True)  # fmt: skip
            img_s = (
                float("nan")
                if args.no_speed
                else speed(speed_dir, work, backbone, "last", args.precision, stage)
            )
            tag = f"{backbone}-maps{stage}{suffix}"
            rows.append(scored(caches["train"], caches["test"], "finetune", args.cv, work / "models" / tag,
                               (backbone, f"maps after stage {stage}", f"{c}×{h}×{w}"), img_s,
                               per_image_kib(caches["train"])))  # fmt: skip

    print(f"\nFashion-MNIST, {args.per_class} training images per class, {args.cv}-fold CV on them; "
          f"test set: the official 10,000; extraction precision {args.precision}")  # fmt: skip
    print("| backbone | layers | features | family | chosen | CV accuracy | test accuracy "
          "| fit s (CV + refit) | cache KiB/image | extract img/s |")  # fmt: skip
    print("| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for backbone, shown, dim, family, params, r, acc, seconds, kib, img_s in rows:
        cv_acc = f"{100 * r['cv_accuracy_mean']:.2f} ± {100 * r['cv_accuracy_std']:.2f}"
        cells = [backbone, shown, dim, family, params, cv_acc, f"{100 * acc:.2f} %", f"{seconds:.0f}",
                 f"{kib:.1f}", f"{img_s:.0f}"]  # fmt: skip
        print("| " + " | ".join(map(str, cells)) + " |")


def scored(
    train: Path, test: Path, family: str, cv: int, output: Path, what: tuple, img_s: float, kib: float
):
    """Fit ``family`` on ``train`` (CV), score it on ``test``; one table row."""
    started = time.perf_counter()
    fitted = fit(train, model=family, cv=cv, output=output)
    seconds = time.perf_counter() - started
    r = fitted.report["families"][family]
    scores = evaluate(test, fitted.model_path)
    params = ", ".join(f"{k.split('__')[-1]}={v:g}" for k, v in r["best_params"].items())
    print(f"  {' '.join(map(str, what))} {family}: CV {100 * r['cv_accuracy_mean']:.2f}, "
          f"test {100 * scores.accuracy:.2f} %, fit {seconds:.0f} s, {img_s:.0f} img/s",
          flush=True)  # fmt: skip
    return (*what, family, params, r, scores.accuracy, seconds, kib, img_s)


if __name__ == "__main__":
    started = time.perf_counter()
    with recorded():
        main()
        print(f"\n({time.perf_counter() - started:.0f} s)")
