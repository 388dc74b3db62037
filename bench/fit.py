"""Time `featcache fit --model all --cv 5` on features of the course's size: 2,600 x 1,280, 26 classes,
and 2,600 x 2,024 (the size of efficientnet_lite0's ``--layers multi`` features).

The features are synthetic (26 Gaussian clusters, non-negative like pooled ReLU features), so
the figure is about speed, not accuracy. The spec's bar is 30 s for all three families on a
2-core CPU; the baseline printed next to it is one plain LogisticRegression fit measured in the
same run (these machines are noisy). Classes are the course's 26 folders with the garbage26
label map, so ``--output DIR`` keeps a confusion matrix that looks like the course's.

``--finetune-stages 4,5`` then times fine-tuning on 2,600 synthetic maps of each stage of
efficientnet_lite0 (the real pretrained weights, 26 classes): one ``FinetuneClassifier`` fit, which
is what ``fit --model finetune`` refits at the end. Its cross-validation costs 2 settings x 5 folds
of such fits on 4/5 of the data, about 9 of them: ``--finetune-cv`` runs and times it all.

    python bench/fit.py [--output DIR] [--dims 1280,2024] [--finetune-stages 4,5] [--finetune-cv]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import recorded

from featcache.backbones import (
    BackboneIdentity,
    Preprocessing,
)
from featcache.cache import FeatureCache, write_cache
from featcache.dataset import load_label_map
from featcache.fit import fit


def course_sized_cache(path: Path, n: int = 2600, d: int = 1280, c: int = 26, seed: int = 0) -> Path:
    r = np.random.default_rng(seed)
    y = np.repeat(np.arange(c), n // c)
    X = np.abs(r.normal(0, 1, (c, d))[y] * 0.35 + r.normal(0, 1, (n, d))).astype(np.float32)
    label_map = load_label_map("garbage26")
    classes = list(label_map.names)[:c]
    paths = [f"{classes[k]}/{i:05d}.jpg" for i, k in enumerate(y)]
    ident = BackboneIdentity("mobilenet_v2", "IMAGENET1K_V1", "0" * 64, Preprocessing(), "avg", d)
    zeros = np.zeros(n, np.int64)
    write_cache(FeatureCache(X, y.astype(np.int32), paths, zeros, zeros, classes, ident, label_map), path)
    return path


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="keep the model, report and confusion matrix here")
    parser.add_argument("--dims", default="1280,2024", help="feature sizes to time, comma-separated")
    parser.add_argument(
        "--finetune-stages", default="4,5", help="maps stages to time fine-tuning on ('': none)"
    )
    parser.add_argument(
        "--finetune-cv", action="store_true", help="time the whole fit --model finetune --cv 5"
    )
    args = parser.parse_args()
    for stage in [int(s) for s in args.finetune_stages.split(",") if s]:
        time_finetune(stage, args.finetune_cv)
    for d in map(int, args.dims.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            cache = course_sized_cache(Path(tmp) / "features.h5", d=d)
            X = np.abs(np.random.default_rng(1).normal(size=(2600, d))).astype(np.float32)
            y = np.repeat(np.arange(26), 100)
            start = time.perf_counter()
            LogisticRegression(max_iter=100).fit(X, y)
            baseline = time.perf_counter() - start
            start = time.perf_counter()
            result = fit(cache, model="all", cv=5, output=args.output or Path(tmp) / "models")
            total = time.perf_counter() - start
        report = result.report
        print(f"fit --model all --cv 5 on {report['n_images']} x {d} features, {report['n_classes']} classes")
        for name, r in report["families"].items():
            settings = len(r["grid"])
            print(f"  {name:8} {r['fit_seconds']:6.1f} s  ({settings} settings x 5 folds)  "
                  f"CV accuracy {100 * r['cv_accuracy_mean']:.1f} %")  # fmt: skip
        ratio = total / baseline
        print(f"  total    {total:6.1f} s  (bar: 30 s) = {ratio:.1f}x one plain LogisticRegression fit")
        print(f"  (that baseline fit took {baseline:.2f} s in this run)", flush=True)


def time_finetune(stage: int, whole_cv: bool, n: int = 2600, c: int = 26) -> None:
    from featcache.backbones import get_entry
    from featcache.backbones.build import build_backbone
    from featcache.finetune import FinetuneClassifier

    identity = build_backbone("efficientnet_lite0", maps=stage, engine="torch", traced=False).identity
    shape = get_entry("efficientnet_lite0").maps_shape(stage)
    r = np.random.default_rng(0)
    y = np.repeat(np.arange(c), n // c)
    maps = np.maximum(r.normal(0, 1, (c, *shape))[y] * 0.5 + r.normal(0, 1, (n, *shape)), 0).astype(
        np.float16
    )
    clf = FinetuneClassifier(identity.to_dict())
    start = time.perf_counter()
    clf.fit(maps, y)
    one = time.perf_counter() - start
    per_image = f"{clf.n_iter_ * n / one:.0f} image-epochs/s"
    dims = "x".join(map(str, shape))
    print(f"finetune above stage {stage} ({dims} maps), {n} images, {c} classes: one fit of "
          f"{clf.n_iter_} epochs {one:.0f} s ({per_image})", flush=True)  # fmt: skip
    if whole_cv:
        with tempfile.TemporaryDirectory() as tmp:
            zeros = np.zeros(n, np.int64)
            paths = [f"c{k:02d}/{i:05d}.jpg" for i, k in enumerate(y)]
            cache = FeatureCache(np.zeros((n, 1280), np.float32), y.astype(np.int32), paths, zeros, zeros,
                                 [f"c{k:02d}" for k in range(c)], identity, maps=maps)  # fmt: skip
            write_cache(cache, Path(tmp) / "maps.h5")
            start = time.perf_counter()
            fit(Path(tmp) / "maps.h5", model="finetune", cv=5, output=Path(tmp) / "models")
            print(f"  fit --model finetune --cv 5: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    with recorded():
        main()
