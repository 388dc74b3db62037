"""The machine's bound on extraction, and how close ``featcache extract`` gets to it.

Every image costs the core-time of its decoding and resizing plus the network's core-time for it,
so on C cores no pipeline extracts more than ``C / (decode + network)`` images per second. Per
image folder and per precision the CPU supports (fp32, bf16 with AMX or AVX512-BF16, int8), this
measures, in one run:

- decode: featcache's loader (``load_pixels``) on one thread, over the folder's images (the files
  read once before, so the page cache holds them): its thread CPU time per image;
- network: the compiled OpenVINO network alone on random uint8 batches of 32, with the thread
  settings extract uses (OpenVINO's defaults: every core), for a few seconds after two warm-up
  batches: C / its images per second is its core-time per image;
- bound: ``C / (decode + network)`` images/s;
- extract: ``featcache extract``'s throughput on the same folder (a process of its own, from the
  moment its network is ready to its last batch; reruns, with the IR saved by a first run);
- efficiency = extract / bound.

Each measure is taken ``--repeat`` times (3) and the median shown: this machine's figures vary by
about a tenth from run to run.

    python bench/limit.py                      # 640 28x28 PNGs, 640 300x300 JPEGs, 96 12 MP JPEGs
    python bench/limit.py --png 320 --square 320 --big 48   # a quicker run
    python bench/limit.py --folder DATA_DIR    # a folder of your own instead
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import recorded

HERE = Path(__file__).resolve().parent
NETWORK_SECONDS = 4.0
BATCH = 32


def decode_seconds(paths: list[Path], prep) -> float:
    """Thread CPU seconds per image of featcache's decode and resize, on this thread."""
    from featcache.images import load_pixels

    for path in paths:  # into the page cache
        path.read_bytes()
    start = time.thread_time()
    for path in paths:
        load_pixels(path, prep)
    return (time.thread_time() - start) / len(paths)


def network_rate(backbone: str, precision: str) -> tuple[float, object]:
    """Images per second of the compiled OpenVINO network alone, and its preprocessing."""
    import warnings

    from featcache.backbones.build import build_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = build_backbone(backbone, engine="openvino", precision=precision)
    prep = net.preprocessing
    pixels = np.random.default_rng(0).integers(0, 256, (BATCH, prep.size, prep.size, 3), dtype=np.uint8)
    for _ in range(2):
        net.embed(pixels)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < NETWORK_SECONDS:
        net.embed(pixels)
        images += BATCH
    return images / (time.perf_counter() - start), prep


_EXTRACT = """
import json, sys, time, warnings
from featcache.extract import extract

folder, backbone, precision, output = sys.argv[1:]
events = []
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    result = extract(folder, output, backbone=backbone, precision=precision, engine="openvino",
                     overwrite=True, on_progress=lambda p: events.append((time.perf_counter(), p.done)))
(start, first), (end, last) = events[0], events[-1]
print(json.dumps({"images": last - first, "seconds": end - start, "engine": result.engine}))
"""


def extract_rate(folder: Path, backbone: str, precision: str, output: Path, runs: int = 2) -> float:
    """``featcache extract``'s images per second on ``folder``, from the moment its network is ready
    to its last batch (so the first batch's decoding, not overlapped, counts: a little low), in a
    process of its own; the median of the runs after the first (which builds and saves the IR)."""
    rates = []
    for _ in range(runs):
        args = [sys.executable, "-c", _EXTRACT, str(folder), backbone, precision, str(output)]
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"extract failed:\n{done.stderr}")
        run = json.loads(done.stdout.splitlines()[-1])
        assert run["engine"] == "openvino", run
        rates.append(run["images"] / run["seconds"])
    return float(np.median(rates[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--png", type=int, default=640, help="Fashion-MNIST 28x28 PNGs (in total, 10 classes)")
    ap.add_argument("--square", type=int, default=640, help="300x300 JPEGs (q90)")
    ap.add_argument("--big", type=int, default=96, help="4032x3024 JPEGs (q90), phone-photo sized (>= 64)")
    ap.add_argument("--folder", help="an image folder of your own, instead of --png and --big")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--precisions", default="", help="comma-separated; default: those this CPU supports")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measure; the median is shown")
    ap.add_argument("--workdir", default=str(HERE / "out"), help="where the image sets are written")
    args = ap.parse_args()

    from featcache.backbones.build import cpu_has_bf16
    from featcache.dataset import scan

    cores = len(os.sched_getaffinity(0))
    supported = ["fp32", *(["bf16"] if cpu_has_bf16() else []), "int8"]
    precisions = args.precisions.split(",") if args.precisions else supported
    if args.folder:
        sets = [(Path(args.folder).name, Path(args.folder))]
    else:
        import fashion

        sets = fashion.image_sets(Path(args.workdir), png=args.png, square=args.square, big=args.big)
    print(
        f"{args.backbone}, OpenVINO, {cores} cores; decode: core ms per image (one thread); network: img/s "
        f"alone (batches of {BATCH}), net ms = its core ms per image; bound = {cores} / (decode + net)"
    )
    print(
        f"{'images':15} {'n':>5} {'prec':5} {'decode ms':>9} {'network':>8} {'net ms':>7} "
        f"{'bound':>7} {'extract':>8} {'efficiency':>10}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FEATCACHE_CACHE_DIR"] = str(Path(tmp) / "featcache-cache")  # IRs of this run
        for name, folder in sets:
            paths = [folder / f.relpath for f in scan(folder).files]
            for precision in precisions:
                measured = [network_rate(args.backbone, precision) for _ in range(args.repeat)]
                rate, prep = float(np.median([r for r, _ in measured])), measured[0][1]
                decode = float(np.median([decode_seconds(paths, prep) for _ in range(args.repeat)]))
                network = cores / rate
                bound = cores / (decode + network)
                output = Path(tmp) / "features.h5"
                extract = extract_rate(folder, args.backbone, precision, output, args.repeat + 1)
                row = (
                    f"{name:15} {len(paths):5d} {precision:5} {decode * 1e3:9.2f} {rate:8.1f} "
                    f"{network * 1e3:7.2f} {bound:7.1f} {extract:8.1f} {extract / bound:10.2f}"
                )
                print(row, flush=True)


if __name__ == "__main__":
    with recorded():
        main()
