"""5-fold CV of FinetuneClassifier settings on the training images alone (the test accuracy is
printed beside it for information, never to choose), on efficientnet_lite0's maps of stages 3-5.

    python bench/finetune_settings.py bench/out/accuracy/train100 bench/out/accuracy/test [--device cuda]

It fits 15 settings x 6 times: minutes on a GPU, hours on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from harness import recorded
from sklearn.model_selection import StratifiedKFold

from featcache.cache import read_cache
from featcache.extract import extract
from featcache.finetune import FinetuneClassifier

SETTINGS = [
    (4, {}), (4, {"lr_max": 3e-3}), (4, {"lr_max": 3e-4}), (4, {"epochs": 40}), (4, {"weight_decay": 0.01}),
    (4, {"weight_decay": 0.2}), (4, {"augment": False}), (4, {"batch_size": 32}),
    (4, {"validation_fraction": 0.0}), (4, {"patience": 10, "epochs": 40}), (4, {"label_smoothing": 0.0}),
    (3, {}), (5, {}), (5, {"lr_max": 3e-3}),
]  # fmt: skip
"""Changes to the estimator's settings of the first measurement (early stopping on a tenth)."""
BASE = {"validation_fraction": 0.1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train", type=Path)
    parser.add_argument("test", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/finetune_settings"))
    args = parser.parse_args()
    caches = {}
    for stage in sorted({s for s, _ in SETTINGS}):
        caches[stage] = [
            read_cache(extract(folder, args.workdir / f"{name}{stage}.h5", backbone="efficientnet_lite0",
                               maps=stage, device=args.device).output, maps=True)
            for name, folder in (("train", args.train), ("test", args.test))
        ]  # fmt: skip
    for stage, changes in SETTINGS:
        train, test = caches[stage]
        X, y = train.labelled(maps=True)
        Xt, yt = test.labelled(maps=True)
        params = {**BASE, **changes, "device": args.device}
        started, accs = time.perf_counter(), []
        for a, b in StratifiedKFold(5, shuffle=True, random_state=0).split(X, y):
            clf = FinetuneClassifier(train.identity.to_dict(), **params).fit(X[a], y[a])
            accs.append(np.mean(clf.predict(X[b]) == y[b]))
        seconds = time.perf_counter() - started
        clf = FinetuneClassifier(train.identity.to_dict(), **params).fit(X, y)
        test_acc = 100 * np.mean(clf.predict(Xt) == yt)
        print(f"stage {stage} {changes}: CV {100 * np.mean(accs):.2f} ± {100 * np.std(accs):.2f}  "
              f"test {test_acc:.2f}  (CV {seconds:.0f} s, epochs run {clf.n_iter_})", flush=True)  # fmt: skip


if __name__ == "__main__":
    with recorded():
        main()
