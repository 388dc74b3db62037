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
(p,) = session.run(None, {"pixels": np.asarray(image)[None]})[0]
print(names[p.argmax()], f"{p.max():.1%}")
