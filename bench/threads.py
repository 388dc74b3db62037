"""How decoding threads (--workers) and OpenVINO's inference threads share the cores.

Runs ``extract`` with ``efficientnet_lite0`` on the OpenVINO engine over 500x375 JPEGs (Fashion-MNIST
scaled up, quality 90) for 1 to 3 decoding threads and OpenVINO's default, 1 or 2 inference
threads, in fp32 and bf16, and prints each whole command's images/s (a warm-up run first).

    python bench/threads.py [--jpeg 320]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from harness import recorded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jpeg", type=int, default=320, help="500x375 JPEGs")
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()

    import fashion
    import openvino as ov

    import featcache.backbones.openvino_engine as engine
    from featcache.extract import extract

    data = fashion.jpeg_folder(args.workdir, args.jpeg)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FEATCACHE_CACHE_DIR"] = tmp
        out = Path(tmp) / "features.h5"
        print(f"{'inference threads':>17} {'decoding threads':>16} {'fp32 img/s':>10} {'bf16 img/s':>10}")
        for threads in (0, 1, 2):

            def compile_with(model, identity, precision=None, threads=threads):
                config = {"INFERENCE_PRECISION_HINT": engine._PRECISIONS[precision or identity.precision]}
                if threads:
                    config["INFERENCE_NUM_THREADS"] = threads
                return ov.Core().compile_model(model, "CPU", config)

            engine._compile = compile_with
            for workers in (1, 2, 3):
                rates = []
                for precision in ("fp32", "bf16"):
                    settings = dict(backbone="efficientnet_lite0", precision=precision, workers=workers)
                    extract(data, out, overwrite=True, **settings)  # builds or loads the IR, warms up
                    start = time.perf_counter()
                    result = extract(data, out, overwrite=True, **settings)
                    rates.append(result.n_images / (time.perf_counter() - start))
                shown = threads or "default"
                print(f"{shown:>17} {workers:>16} {rates[0]:10.1f} {rates[1]:10.1f}", flush=True)


if __name__ == "__main__":
    with recorded():
        main()
