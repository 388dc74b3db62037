"""Extraction throughput: featcache vs the naive pipeline, on the same images, in one run.

Naive pipeline (the spec's baseline): torchvision ImageFolder + DataLoader(num_workers=2, batch 32)
+ the unmodified model + mean pooling of the last feature map. Each measurement runs in its own
process so that peak memory is its own, and is timed from a process that has imported torch to
features in memory: each side's other imports (torchvision, timm, featcache), building the model
and reading the images all count. Prints, per image set, backbone and precision, images/s,
the ratio, peak RSS, and the lowest per-image cosine similarity between the two pipelines'
features (real weights only). featcache runs twice per engine and precision: once with an empty
cache folder (it builds the network and saves its trace or OpenVINO IR), then again (it loads
them, as every later run on a user's machine does). ``--memory`` then compares extract's peak
RSS over two sizes.

    python bench/extract.py                       # three image sets, both backbones, both engines,
                                                  # fp32 and bf16
    python bench/extract.py --png 200 --jpeg 100 --big 20  # a quicker run
    python bench/extract.py --png 0 --jpeg 0 --memory 1000,5000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from harness import recorded

HERE = Path(__file__).resolve().parent


def _peak_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + kids) / 1024


def run_naive(data: Path, backbone: str, weights: str | None, out: Path) -> dict:
    import torch

    start = time.perf_counter()
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from featcache.backbones.build import build_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # only for its unmodified model and preprocessing
        net = build_backbone(backbone, weights=weights, optimize=False)
    model, entry, prep = net.model, net.entry, net.preprocessing
    tf = transforms.Compose(
        [
            transforms.Resize((prep.size, prep.size)),
            transforms.ToTensor(),
            transforms.Normalize(prep.mean, prep.std),
        ]
    )
    ds = datasets.ImageFolder(str(data), transform=tf)
    loader = DataLoader(ds, batch_size=32, num_workers=2)
    feats, first = [], None
    with torch.no_grad():
        for x, _ in loader:
            feats.append(entry.features(model, x).mean(dim=(2, 3)).numpy())
            first = first or (time.perf_counter(), len(x))
    seconds = time.perf_counter() - start
    marginal = (len(ds) - first[1]) / (start + seconds - first[0]) if len(ds) > first[1] else float("nan")
    np.save(out, np.concatenate(feats))
    paths = [str(Path(p).relative_to(data)) for p, _ in ds.samples]
    return {
        "images": len(ds),
        "seconds": seconds,
        "marginal": marginal,
        "peak_mb": _peak_mb(),
        "paths": paths,
    }


def run_featcache(data: Path, backbone: str, weights: str | None, out: Path, extra: dict) -> dict:
    import torch  # noqa: F401  (imported before the clock starts, as for the naive pipeline)

    start = time.perf_counter()
    from featcache.cache import read_cache
    from featcache.extract import extract

    first = []

    def note_first_batch(progress) -> None:
        if progress.stage == "extract" and progress.done and not first:
            first.append((time.perf_counter(), progress.done))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract(
            data, out.with_suffix(".h5"), backbone=backbone, weights=weights, overwrite=True,
            on_progress=note_first_batch, **extra,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    n, at = first[0][1], first[0][0]
    marginal = (result.n_images - n) / (start + seconds - at) if result.n_images > n else float("nan")
    cache = read_cache(result.output)
    np.save(out, cache.features.astype(np.float32))
    return {"images": result.n_images, "seconds": seconds, "marginal": marginal, "peak_mb": _peak_mb(),
            "paths": cache.paths, "engine": result.engine}  # fmt: skip


def _child(args: argparse.Namespace) -> None:
    extra = json.loads(args.extra)
    if args.child == "naive":
        res = run_naive(Path(args.data), args.backbone, args.weights, Path(args.out))
    else:
        res = run_featcache(Path(args.data), args.backbone, args.weights, Path(args.out), extra)
    print(json.dumps(res))


def measure(
    kind: str, data: Path, backbone: str, weights: str | None, out: Path, extra: dict | None = None
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--data",
        str(data),
        "--backbone",
        backbone,
        "--out",
        str(out),
        "--extra",
        json.dumps(extra or {}),
    ]
    if weights:
        cmd += ["--weights", weights]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def min_cosine(a: np.ndarray, pa: list[str], b: np.ndarray, pb: list[str]) -> float:
    index = {p: i for i, p in enumerate(pb)}
    b = b[[index[p] for p in pa]]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(cos.min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--png", type=int, default=640, help="Fashion-MNIST 28x28 PNGs (in total, 10 classes)")
    ap.add_argument("--jpeg", type=int, default=320, help="500x375 JPEGs (q90) upscaled from Fashion-MNIST")
    ap.add_argument("--big", type=int, default=40, help="4032x3024 JPEGs (q90), phone-photo sized")
    ap.add_argument("--engines", default="torch,openvino", help="comma-separated featcache engines")
    ap.add_argument(
        "--backbones",
        default="mobilenet_v2:random,efficientnet_lite0",
        help="comma-separated NAME[:WEIGHTS]; mobilenet_v2 runs with random weights offline",
    )
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated featcache precisions")
    ap.add_argument(
        "--memory",
        default="",
        help="N1,N2: peak RSS of featcache extract (mobilenet_v2:random, PNGs) over N1 and N2 images",
    )
    ap.add_argument("--workdir", default=str(HERE / "out"), help="where the image sets are written")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    for hidden in ("--data", "--backbone", "--weights", "--out", "--extra"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)

    import fashion

    work = Path(args.workdir)
    sets = fashion.image_sets(work, args.png, args.jpeg, args.big)
    if sets:
        print(
            "img/s: marginal throughput, from the end of the first batch to the end of the command;\n"
            "whole: the whole command from 'torch imported' (the rerun, with the saved trace or IR);\n"
            "first s: the first run's seconds (it builds the network and saves the trace or IR)"
        )
        print(
            f"{'images':14} {'backbone':20} {'engine':8} {'prec':4} {'n':>5} {'naive':>6} {'fc':>6} "
            f"{'ratio':>6} {'whole':>6} {'ratio':>6} {'first s':>7} {'naive MB':>8} {'fc MB':>6} "
            f"{'min cos':>8}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        # featcache's saved traces and IRs go to a folder of this run: the first featcache run of
        # each backbone and engine builds the network and saves them, the rerun loads them
        os.environ["FEATCACHE_CACHE_DIR"] = str(Path(tmp) / "featcache-cache")
        for set_name, folder in sets:
            for spec in args.backbones.split(","):
                name, _, weights = spec.partition(":")
                label = f"{name}{':' + weights if weights else ''}"
                naive = measure("naive", folder, name, weights or None, Path(tmp) / "naive.npy")
                rows = []
                for engine in args.engines.split(","):
                    for precision in args.precisions.split(","):
                        extra = {"precision": precision, "engine": engine}
                        fc = measure("featcache", folder, name, weights or None, Path(tmp) / "fc.npy", extra)
                        again = measure(
                            "featcache", folder, name, weights or None, Path(tmp) / "fc2.npy", extra
                        )
                        naive_feats = np.load(Path(tmp) / "naive.npy")
                        cos = min(
                            min_cosine(np.load(Path(tmp) / out), run["paths"], naive_feats, naive["paths"])
                            for out, run in (("fc.npy", fc), ("fc2.npy", again))
                        )
                        # untrained MobileNetV2 features are ~1e-9 in size: their cosine says nothing
                        cos_text = "n/a" if weights == "random" else f"{cos:.5f}"
                        rows.append((again["engine"], precision, fc, again, cos_text))
                # the naive pipeline runs before and after featcache; its rates are over both runs
                late = measure("naive", folder, name, weights or None, Path(tmp) / "naive2.npy")
                n_rate = (naive["marginal"] + late["marginal"]) / 2
                n_whole = (naive["images"] + late["images"]) / (naive["seconds"] + late["seconds"])
                naive_mb = max(naive["peak_mb"], late["peak_mb"])
                for engine, precision, fc, again, cos_text in rows:
                    rate, whole = again["marginal"], again["images"] / again["seconds"]
                    print(
                        f"{set_name:14} {label:20} {engine:8} {precision:4} {fc['images']:5d} {n_rate:6.1f} "
                        f"{rate:6.1f} {rate / n_rate:5.2f}x {whole:6.1f} {whole / n_whole:5.2f}x "
                        f"{fc['seconds']:7.1f} {naive_mb:8.0f} {max(fc['peak_mb'], again['peak_mb']):6.0f} "
                        f"{cos_text:>8}",
                        flush=True,
                    )
        if args.memory:
            sizes = [int(n) for n in args.memory.split(",")]
            peaks = []
            for n in sizes:
                folder = fashion.write_folder(work / f"fmnist_png_{n}", "train", n // 10)
                res = measure("featcache", folder, "mobilenet_v2", "random", Path(tmp) / "fc.npy")
                peaks.append(res["peak_mb"])
                shown = f"memory: extract of {res['images']} PNGs, peak RSS {res['peak_mb']:.0f} MB"
                print(shown, flush=True)
            print(f"memory: peak RSS difference {peaks[-1] - peaks[0]:+.0f} MB (bar: < 150 MB)")


if __name__ == "__main__":
    with recorded(write="--child" not in sys.argv):
        main()
