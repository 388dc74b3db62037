"""Prediction latency: warm single-image calls, and a cold `featcache predict` next to `import torch`.

A small model is fit on synthetic 500x375 JPEG photos (quality 90) for each backbone; then, for
each engine:
- first: the wall time of the very first ``featcache predict IMAGE --engine E``, which builds the
  backbone and saves its trace or OpenVINO IR (in a private cache folder, so every run of this
  script starts bare);
- warm: the median of many ``Predictor.predict(path)`` calls on one JPEG (bar: 8 ms);
- cold: the wall time of ``featcache predict IMAGE`` in a fresh process once the trace or IR is
  saved (bar: 1.0 s), next to that of ``python -c "import torch"`` measured in the same run,
  alternating; "torch" says whether the cold process imported torch.

    python bench/predict.py [--calls 100] [--cold-runs 5] [--engines openvino,torch]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from harness import recorded
from PIL import Image

from featcache.extract import extract
from featcache.fit import fit
from featcache.predictor import Predictor

BACKBONES = (("efficientnet_lite0", None), ("mobilenet_v2", "random"))


def photos(root: Path, classes: int = 3, per_class: int = 8, size=(500, 375)) -> Path:
    """Smooth colour fields with blocks, one hue per class, saved as JPEG quality 90."""
    r = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a, b = r.uniform(0.5, 2, 2)
            waves = [np.sin(a * xx * 6 + c), np.cos(b * yy * 6 - c), np.sin((xx + yy) * 3 + c * 2)]
            base = np.stack(waves, -1)
            img = ((base * 0.5 + 0.5) * 255).astype(np.uint8)
            y0, x0 = r.integers(0, h - 80), r.integers(0, w - 80)
            img[y0 : y0 + 80, x0 : x0 + 80] = r.integers(0, 255, 3)
            Image.fromarray(img).save(root / f"class{c}" / f"{i:03d}.jpg", quality=90)
    return root


def featcache_command() -> list[str]:
    script = Path(sys.executable).with_name("featcache")
    if script.exists():
        return [str(script)]
    return [sys.executable, str(Path(__file__).resolve().parents[1] / "cli.py")]


def wall(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _imports_torch(model: Path, image: Path, engine: str, cwd: Path, env: dict[str, str]) -> bool:
    """Whether a cold ``featcache predict`` on ``engine`` imports torch."""
    code = (
        "import sys\nfrom featcache.cli import main\n"
        f"try: main(['predict', {str(image)!r}, '--model-path', {str(model)!r}, '--engine', {engine!r}])\n"
        "except SystemExit: pass\nprint('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1] == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100, help="warm calls per backbone")
    parser.add_argument("--cold-runs", type=int, default=5, help="fresh processes per command")
    parser.add_argument("--engines", default="openvino,torch", help="comma-separated engines")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-predict-"))
    try:
        data = photos(tmp / "data")
        image = data / "class1" / "003.jpg"
        os.environ["FEATCACHE_CACHE_DIR"] = str(tmp / "featcache-cache")
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        width, height = Image.open(image).size
        print(f"one {width}x{height} JPEG, "
              f"{os.cpu_count()} CPUs, torch threads {__import__('torch').get_num_threads()}")  # fmt: skip
        print(f"{'backbone':24} {'engine':8} {'first':>7} {'warm median':>11} {'p90':>7}  "
              f"{'cold predict':>12} {'torch':>5} {'import torch':>12}")  # fmt: skip
        for name, weights in BACKBONES:
            label = f"{name}:{weights}" if weights else name
            model_dir = tmp / name
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache = extract(data, model_dir / "features.h5", backbone=name, weights=weights).output
                model = fit(cache, model="logreg", cv=2, output=model_dir / "models").model_path
            for engine in args.engines.split(","):
                shutil.rmtree(tmp / "featcache-cache", ignore_errors=True)  # extract saved one: start bare
                cmd = [
                    *featcache_command(),
                    "predict",
                    str(image),
                    "--model-path",
                    str(model),
                    "--engine",
                    engine,
                ]
                first = wall(cmd, model_dir, env)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    predictor = Predictor.load(model, device="cpu", engine=engine)
                for _ in range(5):
                    predictor.predict(str(image))
                times = []
                for _ in range(args.calls):
                    start = time.perf_counter()
                    predictor.predict(str(image))
                    times.append(time.perf_counter() - start)
                warm = 1000 * statistics.median(times)
                p90 = 1000 * float(np.percentile(times, 90))
                cold, torch_only = [], []
                for _ in range(args.cold_runs):
                    torch_only.append(wall([sys.executable, "-c", "import torch"], tmp, env))
                    cold.append(wall(cmd, model_dir, env))
                c, t = statistics.median(cold), statistics.median(torch_only)
                imports = _imports_torch(model, image, engine, model_dir, env)
                row = (f"{label:24} {engine:8} {first:5.2f} s {warm:8.1f} ms {p90:4.1f} ms  {c:10.2f} s "
                       f"{'yes' if imports else 'no':>5} {t:10.2f} s")  # fmt: skip
                print(row, flush=True)
        print("bars: warm <= 8 ms; cold <= 1.0 s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    with recorded():
        main()
