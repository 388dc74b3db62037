"""Throughput and latency of `featcache serve` on loopback, against `featcache predict` in-process.

A model is fit on the demo images (efficientnet_lite0, logistic regression). For ``--seconds``
each, N concurrent clients (threads, one connection each) post single PNGs to ``/predict``; one
request in ten is a bad upload, which must come back as a 400 and is not counted as a
prediction. The server runs with batching (``--max-batch 32``) and without (``--max-batch 1``).
The baseline is ``Predictor.predict`` on the same images, one at a time, in this process.

    python bench/serve.py [--seconds 20] [--clients 1,4,16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import httpx
from harness import recorded
from support import serving

from featcache.demo import DATA
from featcache.extract import extract
from featcache.fit import fit
from featcache.predictor import Predictor

BAD = b"this is not an image"


def clients(url: str, images: list[Path], n: int, seconds: float) -> dict:
    """Run ``n`` client threads for ``seconds``; their latencies and counts."""
    latencies: list[float] = []
    counts = {"ok": 0, "bad_refused": 0, "errors": 0}
    lock = threading.Lock()
    payloads = [(p.name, p.read_bytes()) for p in images]
    deadline = time.monotonic() + seconds

    def run(k: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            i = k
            while time.monotonic() < deadline:
                bad = i % 10 == 9
                name, data = ("bad.png", BAD) if bad else payloads[i % len(payloads)]
                start = time.perf_counter()
                try:
                    response = client.post("/predict", files=[("files", (name, data, "image/png"))])
                    status = response.status_code
                except httpx.HTTPError:
                    status = -1
                elapsed = time.perf_counter() - start
                with lock:
                    if bad and status == 400:
                        counts["bad_refused"] += 1
                    elif not bad and status == 200:
                        counts["ok"] += 1
                        latencies.append(elapsed)
                    else:
                        counts["errors"] += 1
                i += n

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {**counts, "seconds": time.monotonic() - started, "latencies": np.array(latencies)}


def in_process(model: Path, images: list[Path], seconds: float) -> dict:
    predictor = Predictor.load(model)
    predictor.predict(images[0])  # warm
    latencies = []
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    i = 0
    while time.monotonic() < deadline:
        start = time.perf_counter()
        predictor.predict(images[i % len(images)])
        latencies.append(time.perf_counter() - start)
        i += 1
    return {"ok": i, "seconds": time.monotonic() - started, "latencies": np.array(latencies)}


def row(what: str, r: dict) -> str:
    lat = r["latencies"] * 1000
    rps = r["ok"] / r["seconds"]
    return (f"{what:34} {rps:8.1f} {np.percentile(lat, 50):8.1f} {np.percentile(lat, 99):8.1f} "
            f"{r.get('bad_refused', 0):6d} {r.get('errors', 0):6d}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", default="1,4,16")
    args = parser.parse_args()
    images = sorted((DATA / "test").rglob("*.png"))
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "features.h5"
        extract(DATA / "train", cache, backbone="efficientnet_lite0")
        model = fit(cache, model="logreg", output=Path(tmp) / "models").model_path
        print(f"one {images[0].stat().st_size}-byte PNG per request ({len(images)} demo images), "
              f"{args.seconds:g} s per line; bad uploads are 1 request in 10", flush=True)  # fmt: skip
        print(f"{'':34} {'pred/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'bad400':>6} {'errors':>6}")
        print(row("featcache predict, in-process", in_process(model, images, args.seconds)), flush=True)
        for batch in (32, 1):
            with serving(model, "--max-batch", str(batch)) as url:
                for n in map(int, args.clients.split(",")):
                    result = clients(url, images, n, args.seconds)
                    print(row(f"serve --max-batch {batch:<2}, {n:2d} client(s)", result), flush=True)


if __name__ == "__main__":
    with recorded():
        main()
