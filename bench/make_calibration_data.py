"""Rebuild the photographs INT8 quantisation is calibrated on (featcache/calibration_data/).

    python bench/make_calibration_data.py

Seven colour photographs from scikit-image's sample data (``skimage.data``, installed with
featcache's test extras), each in the public domain or CC0, scaled to at most 512 pixels on the
long side and saved as JPEG (quality 90). ``featcache.backbones.quantize`` cuts its calibration
images from them; README.md in that folder names each source and its licence.
"""

from __future__ import annotations

from pathlib import Path

import skimage.data
from PIL import Image

OUT = Path(__file__).resolve().parent.parent / "featcache" / "calibration_data"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
LONG_SIDE = 512


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name in PHOTOS:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        scale = LONG_SIDE / max(img.size)
        if scale < 1:
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
        img.save(OUT / f"{name}.jpg", quality=90)
        print(f"{name}.jpg {img.size[0]}x{img.size[1]}")


if __name__ == "__main__":
    main()
