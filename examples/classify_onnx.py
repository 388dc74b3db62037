"""Classify one image with a model that ``featcache export`` wrote, with ONNX Runtime alone (no featcache).

Usage: python examples/classify_onnx.py model.onnx IMAGE
"""

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

session = ort.InferenceSession(sys.argv[1])
meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
size, names = meta["featcache.preprocessing"]["size"], meta["featcache.names"]
image = ImageOps.exif_transpose(Image.open(sys.argv[2])).convert("RGB").resize((size, size), Image.BILINEAR)
outputs = session.run(None, {"pixels": np.asarray(image)[None]})
p = outputs[0][0]
if "featcache.ood" in meta and outputs[1][0] > meta["featcache.ood"]["threshold"]:
    print(f"unknown (closest: {names[p.argmax()]} {p.max():.0%})")  # unlike every training image
else:
    print(names[p.argmax()], f"{p.max():.1%}")
