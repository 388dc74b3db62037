"""Decode + resize core-time per image: featcache's loader against the faster ways the field uses.

Per image set, each way is timed on one thread (thread CPU time, the files read into memory first,
the median of ``--repeat`` passes, the ways taking turns), and its pixels compared with the
baseline's (largest difference in grey levels, and the share of pixel values that differ at all):

- before: featcache's loader until issue 30 (Pillow; JPEG draft decoding to >= 224 pixels; a copy
  of every image from ``exif_transpose``; grey images made RGB before the resize): the baseline;
- featcache: ``load_pixels`` as extract runs it now (turned in place only when EXIF says so; a grey
  image decoded and resized in Pillow's one-channel mode, then repeated to RGB);
- reducing-gap: Pillow's ``resize(..., reducing_gap=2)`` (``Image.reduce`` first, then the resize);
- simplejpeg: libjpeg-turbo through simplejpeg, scaled in the DCT as draft does, then Pillow's resize;
- simplejpeg-fast: the same with libjpeg-turbo's fast integer DCT and plain chroma upsampling;
- torch-resize: featcache's decoding, then PyTorch's antialiased bilinear resize on uint8 (its
  vectorised kernel, the one torchvision uses), on one thread.

The baseline resizes as the stretch backbones do (Lite0's preprocessing). Needs simplejpeg
(``pip install simplejpeg``), which featcache itself does not use.

    python bench/decode.py                           # 640 28x28 PNGs, 640 300x300 and 96 12 MP JPEGs
    python bench/decode.py --png 320 --square 320 --big 48
"""

from __future__ import annotations

import argparse
import io
import math
import time
from pathlib import Path

import numpy as np
from harness import recorded
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent


def ways(prep):
    """name -> function(bytes) -> size x size x 3 uint8 (or None: not for this image), the first
    being the baseline."""
    from featcache.images import _INTERPOLATIONS, _load, load_pixels, resize

    method = _INTERPOLATIONS[prep.interpolation]
    draft = math.floor(prep.size / prep.crop_pct)

    def before(data: bytes) -> np.ndarray:
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            img.draft(None, (draft, draft))
        img.load()
        return np.array(ImageOps.exif_transpose(img).convert("RGB").resize((prep.size, prep.size), method))

    def featcache(data: bytes) -> np.ndarray:
        return load_pixels(data, prep)

    def reducing_gap(data: bytes) -> np.ndarray:
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            img.draft("RGB", (draft, draft))
        return np.asarray(img.convert("RGB").resize((prep.size, prep.size), method, reducing_gap=2.0))

    def simplejpeg_way(fast: bool):
        import simplejpeg

        def decode(data: bytes) -> np.ndarray | None:
            if not simplejpeg.is_jpeg(data):
                return None
            pixels = simplejpeg.decode_jpeg(data, "RGB", fastdct=fast, fastupsample=fast,
                                            min_height=draft, min_width=draft)  # fmt: skip
            return resize(Image.fromarray(pixels), prep)

        return decode

    def torch_resize(data: bytes) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        img = _load(data, draft, grey=False)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]
        size = (prep.size, prep.size)
        out = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return out[0].permute(1, 2, 0).numpy()

    return {"before": before, "featcache": featcache, "reducing-gap": reducing_gap,
            "simplejpeg": simplejpeg_way(False), "simplejpeg-fast": simplejpeg_way(True),
            "torch-resize": torch_resize}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--png", type=int, default=640)
    ap.add_argument("--square", type=int, default=640)
    ap.add_argument("--big", type=int, default=96)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--workdir", default=str(HERE / "out"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)

    import fashion

    from featcache.backbones.registry import get_entry
    from featcache.dataset import scan

    prep = get_entry(args.backbone).preprocessing
    print(f"{args.backbone}: {prep.size}x{prep.size} {prep.resize} ({prep.interpolation}); one thread")
    print(f"{'images':15} {'way':16} {'core ms':>8} {'ratio':>6} {'max diff':>8} {'differ':>7}")
    sets = fashion.image_sets(Path(args.workdir), png=args.png, square=args.square, big=args.big)
    for name, folder in sets:
        files = [(folder / f.relpath).read_bytes() for f in scan(folder).files]
        fitting = {way: decode for way, decode in ways(prep).items() if decode(files[0]) is not None}
        times: dict[str, list[float]] = {way: [] for way in fitting}
        pixels = {}
        for _ in range(args.repeat):  # the ways in turn, so that the machine's drift touches them alike
            for way, decode in fitting.items():
                start = time.thread_time()
                out = [decode(data) for data in files]
                times[way].append((time.thread_time() - start) / len(files))
                pixels[way] = np.stack(out).astype(np.int16)
        base, expected = float(np.median(times["before"])), pixels["before"]
        for way in fitting:
            seconds = float(np.median(times[way]))
            diff = np.abs(pixels[way] - expected)
            print(f"{name:15} {way:16} {seconds * 1e3:8.3f} {seconds / base:6.2f} {diff.max():8d} "
                  f"{100 * np.mean(diff > 0):6.2f}%", flush=True)  # fmt: skip


if __name__ == "__main__":
    with recorded():
        main()
