"""The CUDA path on a GPU machine: extraction throughput, and fine-tuning on the GPU.

On a folder of labelled training images and a test folder (``bench/accuracy.py`` writes
Fashion-MNIST ones): extraction speed on ``--device cuda`` (PyTorch) in fp32 and bf16, with and
without the maps of ``--maps``; ``fit --model finetune`` (5-fold CV on the GPU) on those maps,
scored on the test cache; and the fine-tuned model through ``Predictor`` on the GPU against the
CPU. Prints the CPU line and the GPU's name first.

    python bench/cuda.py --train bench/out/accuracy/train100 --test bench/out/accuracy/test
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from harness import recorded

from featcache.extract import extract
from featcache.fit import evaluate, fit
from featcache.predictor import Predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument(
        "--speed", type=Path, default=None, help="folder for the speed runs (default: --test)"
    )
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/cuda"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--maps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script without a GPU")
    args = parser.parse_args()
    gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"gpu: {gpu_name}; torch {torch.__version__}", flush=True)
    work = args.workdir
    common = dict(backbone=args.backbone, device=args.device, batch_size=args.batch_size, workers=8)
    for precision in ("fp32", "bf16"):
        for maps in (None, args.maps):
            for _ in range(2):
                r = extract(
                    args.test, work / "speed.h5", precision=precision, maps=maps, overwrite=True, **common
                )
            print(f"extract {r.n_images} test images on {r.engine}/{args.device}, {precision}, maps {maps}: "
                  f"{r.n_images / r.seconds:.0f} img/s (second run)", flush=True)  # fmt: skip
    train = extract(args.train, work / "train.h5", maps=args.maps, overwrite=True, **common).output
    test = extract(args.test, work / "test.h5", maps=args.maps, overwrite=True, **common).output
    started = time.perf_counter()
    fitted = fit(train, model="finetune", cv=5, output=work / "models")
    seconds = time.perf_counter() - started
    r = fitted.report["families"]["finetune"]
    scores = evaluate(test, fitted.model_path)
    n = fitted.report["n_images"]
    print(f"fit --model finetune on {n} images (maps of stage {args.maps}), 5-fold CV on the GPU: "
          f"{seconds:.0f} s (CV {r['fit_seconds']:.0f} s), CV {100 * r['cv_accuracy_mean']:.2f} %, "
          f"best {r['best_params']}; test {100 * scores.accuracy:.2f} % on {scores.n_images}",
          flush=True)  # fmt: skip
    files = sorted(args.test.rglob("*.png"))[:256]
    gpu = Predictor.load(fitted.model_path, device=args.device)
    cpu = Predictor.load(fitted.model_path, device="cpu", engine="torch")
    p_gpu, p_cpu = gpu.predict_proba(files), cpu.predict_proba(files)
    print(f"Predictor on {gpu.backbone.engine}/{args.device} against torch/cpu on {len(files)} images: "
          f"largest difference {np.abs(p_gpu - p_cpu).max():.1e}, same label "
          f"{100 * np.mean(p_gpu.argmax(1) == p_cpu.argmax(1)):.1f} %")  # fmt: skip


if __name__ == "__main__":
    with recorded():
        main()
