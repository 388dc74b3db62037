"""Extraction throughput: featcache vs the naive pipeline, on the same images, in one run.

Naive pipeline (the spec's baseline): torchvision ImageFolder + DataLoader(num_workers=2, batch 32)
+ the unmodified model + mean pooling of the last feature map. Each measurement runs in its own
process so that peak memory is its own, and is timed from a process that has imported torch to
features in memory: each side's other imports (torchvision, timm, featcache), building the model
and reading the images all count. Prints, per image set, backbone and precision, images/s,
the ratio, peak RSS, and the lowest per-image cosine similarity between the two pipelines'
features (real weights only). featcache runs twice: once with an empty trace folder (it builds
the network and saves its trace), then again (with real weights it loads the trace, as every
later run on a user's machine does). ``--memory`` then compares extract's peak RSS over two sizes.

    python bench/extract.py                       # both image sets, both backbones, fp32 and bf16
    python bench/extract.py --png 200 --jpeg 100  # a quicker run
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
from cpu import cpu_line

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


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
    feats = []
    with torch.no_grad():
        for x, _ in loader:
            feats.append(entry.features(model, x).mean(dim=(2, 3)).numpy())
    seconds = time.perf_counter() - start
    np.save(out, np.concatenate(feats))
    paths = [str(Path(p).relative_to(data)) for p, _ in ds.samples]
    return {"images": len(ds), "seconds": seconds, "peak_mb": _peak_mb(), "paths": paths}


def run_featcache(data: Path, backbone: str, weights: str | None, out: Path, extra: dict) -> dict:
    import torch  # noqa: F401  (imported before the clock starts, as for the naive pipeline)

    start = time.perf_counter()
    from featcache.cache import read_cache
    from featcache.extract import extract

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract(
            data, out.with_suffix(".h5"), backbone=backbone, weights=weights, overwrite=True, **extra
        )
    seconds = time.perf_counter() - start
    cache = read_cache(result.output)
    np.save(out, cache.features.astype(np.float32))
    return {"images": result.n_images, "seconds": seconds, "peak_mb": _peak_mb(), "paths": cache.paths}


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
    print(cpu_line(), flush=True)
    if args.child:
        return _child(args)

    import fashion

    work = Path(args.workdir)
    sets = []
    if args.png:
        sets.append(
            ("fmnist-png-28", fashion.write_folder(work / f"fmnist_png_{args.png}", "train", args.png // 10))
        )
    if args.jpeg:
        folder = work / f"fmnist_jpeg500_{args.jpeg}"
        sets.append(
            ("jpeg-500x375", fashion.write_folder(folder, "train", args.jpeg // 10, (500, 375), "JPEG"))
        )
    if sets:
        print(
            f"{'images':14} {'backbone':20} {'prec':4} {'n':>5} {'naive img/s':>12} {'fc img/s':>9} "
            f"{'ratio':>6} {'rerun img/s':>12} {'ratio':>6} {'naive MB':>9} {'fc MB':>7} {'min cos':>8}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        # featcache's saved traces go to a folder of this run: the first featcache run of each
        # backbone builds the network and saves its trace, the rerun loads it
        os.environ["FEATCACHE_CACHE_DIR"] = str(Path(tmp) / "featcache-cache")
        for set_name, folder in sets:
            for spec in args.backbones.split(","):
                name, _, weights = spec.partition(":")
                label = f"{name}{':' + weights if weights else ''}"
                naive = measure("naive", folder, name, weights or None, Path(tmp) / "naive.npy")
                rows = []
                for precision in args.precisions.split(","):
                    extra = {"precision": precision}
                    fc = measure("featcache", folder, name, weights or None, Path(tmp) / "fc.npy", extra)
                    again = measure("featcache", folder, name, weights or None, Path(tmp) / "fc2.npy", extra)
                    naive_feats = np.load(Path(tmp) / "naive.npy")
                    cos = min(
                        min_cosine(np.load(Path(tmp) / out), run["paths"], naive_feats, naive["paths"])
                        for out, run in (("fc.npy", fc), ("fc2.npy", again))
                    )
                    f_rate = fc["images"] / fc["seconds"]
                    a_rate = again["images"] / again["seconds"]
                    # untrained MobileNetV2 features are ~1e-9 in size: their cosine says nothing
                    cos_text = "n/a" if weights == "random" else f"{cos:.5f}"
                    rows.append((precision, fc, again, f_rate, a_rate, cos_text))
                # the naive pipeline runs before and after featcache; its rate is over both runs
                late = measure("naive", folder, name, weights or None, Path(tmp) / "naive2.npy")
                n_rate = (naive["images"] + late["images"]) / (naive["seconds"] + late["seconds"])
                naive_mb = max(naive["peak_mb"], late["peak_mb"])
                for precision, fc, again, f_rate, a_rate, cos_text in rows:
                    print(
                        f"{set_name:14} {label:20} {precision:4} {fc['images']:5d} {n_rate:12.1f} "
                        f"{f_rate:9.1f} {f_rate / n_rate:5.2f}x {a_rate:12.1f} {a_rate / n_rate:5.2f}x "
                        f"{naive_mb:9.0f} {max(fc['peak_mb'], again['peak_mb']):7.0f} {cos_text:>8}",
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
    main()
