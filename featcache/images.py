"""The one image loader: every command that turns a file into pixels goes through here.

Extract and predict both call :func:`load_pixels`, so they cannot preprocess differently.
"""

from __future__ import annotations

import io
import logging
import math
import os
import stat
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from featcache.errors import ImageError
from featcache.preprocessing import Preprocessing

log = logging.getLogger(__name__)

ImageSource = str | os.PathLike | Image.Image | np.ndarray | bytes

#: Largest image (in pixels) that is decoded; bigger ones are refused as possible decompression bombs.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

_INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WHITE = (255, 255, 255, 255)


def load_image(source: ImageSource, draft: int | None = None) -> Image.Image:
    """Return ``source`` as an RGB PIL image with its EXIF orientation applied.

    ``source`` is a file path (the format is decided by content, not extension), the bytes of
    an image file, a PIL image, or a NumPy uint8 array of shape H×W, H×W×1, H×W×3 (RGB) or
    H×W×4 (RGBA). With ``draft``, a
    JPEG file is decoded at 1/2, 1/4 or 1/8 of its size (in the DCT domain, much faster) when
    both sides stay at least ``draft`` pixels. Raises :class:`ImageError` when it cannot be decoded.
    """
    return _load(source, draft, grey=False)


def _load(source: ImageSource, draft: int | None, grey: bool) -> Image.Image:
    """:func:`load_image`; with ``grey``, a grey image stays one 8-bit channel (mode ``L``)."""
    if isinstance(source, np.ndarray):
        return to_rgb(_from_array(source), grey)
    if isinstance(source, Image.Image):
        _check_size(source.size, "image")
        return to_rgb(_orient(source), grey)
    if isinstance(source, (str, os.PathLike)):
        return to_rgb(_orient(_open(Path(source), draft), in_place=True), grey)
    if isinstance(source, bytes):
        if not source:
            raise ImageError(EMPTY, "upload")
        return to_rgb(_orient(_open(io.BytesIO(source), draft), in_place=True), grey)
    raise TypeError(
        f"expected a path, image file bytes, a PIL image or a NumPy uint8 array, got {type(source).__name__}"
    )


def to_rgb(img: Image.Image, grey: bool = False) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent pixels are composited onto white. With
    ``grey``, an 8-bit grey image without transparency is returned as it is (its RGB form repeats it)."""
    if (img.mode == "RGB" or (grey and img.mode == "L")) and "transparency" not in img.info:
        return img
    if img.mode in _SIXTEEN_BIT or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "F":
            arr = arr / 257.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    has_alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return img.convert("RGB")


def resize(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """Resize an RGB (or grey, ``L``) image per ``prep`` and return it as a size×size×3 uint8 array.

    A grey image is resized as one channel and then repeated: the same pixels as resizing its RGB
    form, in a third of the work."""
    method = _INTERPOLATIONS[prep.interpolation]
    s = prep.size
    if prep.resize == "stretch":
        out = img.resize((s, s), method)
    else:
        w, h = img.size
        short = math.floor(s / prep.crop_pct)
        scale = short / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        out = img.resize((nw, nh), method)
        left, top = (nw - s) // 2, (nh - s) // 2
        out = out.crop((left, top, left + s, top + s))
    if out.mode == "L":
        return np.repeat(np.asarray(out)[:, :, None], 3, axis=2)
    return np.array(out, dtype=np.uint8)


def load_pixels(source: ImageSource, prep: Preprocessing) -> np.ndarray:
    """Decode ``source`` and return the network-ready size×size×3 uint8 RGB array."""
    draft = math.floor(prep.size / prep.crop_pct) if prep.jpeg_draft else None
    return resize(_load(source, draft, grey=True), prep)


def try_load_pixels(source: ImageSource, prep: Preprocessing) -> np.ndarray | str:
    """Like :func:`load_pixels`, but a source that cannot be decoded gives the reason as a string."""
    try:
        return load_pixels(source, prep)
    except ImageError as e:
        return e.reason
    except Exception as e:  # no single file may stop a run
        return f"unexpected {type(e).__name__} while decoding: {e}"


def load_batches(
    sources: Sequence[ImageSource], prep: Preprocessing, batch_size: int, workers: int = 2
) -> Iterator[list[np.ndarray | str]]:
    """Decode ``sources`` in batches, each item pixels or the reason it failed.

    With ``workers`` > 0, decoding runs in threads two batches ahead of the consumer, so the
    model and the decoder overlap.
    """
    batches = [sources[i : i + batch_size] for i in range(0, len(sources), batch_size)]
    if workers == 0:
        for batch in batches:
            yield [try_load_pixels(s, prep) for s in batch]
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="featcache-decode") as pool:
        queue: deque = deque()
        for batch in batches:
            queue.append([pool.submit(try_load_pixels, s, prep) for s in batch])
            if len(queue) > 2:
                yield [f.result() for f in queue.popleft()]
        while queue:
            yield [f.result() for f in queue.popleft()]


NOT_A_FILE = "not a regular file (a pipe, socket or device)"


EMPTY = "empty (0 bytes)"


def _open(path: Path | io.BytesIO, draft: int | None = None) -> Image.Image:
    try:
        st = os.stat(path) if isinstance(path, Path) else None
    except OSError:
        st = None  # Image.open below says why
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise ImageError(NOT_A_FILE, path)  # opening a pipe would wait for a writer forever
    if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise ImageError(EMPTY, path)
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can decode", path) from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"refused as a possible decompression bomb ({e})", path) from None
    except FileNotFoundError:
        raise ImageError("no such file (or a broken link)", path) from None
    except PermissionError:
        raise ImageError("permission denied", path) from None
    except IsADirectoryError:
        raise ImageError("a folder, not an image file", path) from None
    except OSError as e:
        if e.errno is None:  # raised by a Pillow decoder, not by the file system
            raise ImageError(f"truncated or corrupt image ({e})", path) from None
        raise ImageError(f"cannot be read ({e.strerror})", path) from None
    except (SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"truncated or corrupt image ({e})", path) from None
    try:
        _check_size(img.size, str(path))
        if draft and img.format == "JPEG":
            img.draft(None, (draft, draft))  # keeps both sides >= draft
        img.load()
    except ImageError:
        img.close()
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        img.close()
        raise ImageError(f"truncated or corrupt image ({e})", path) from None
    return img


def _check_size(size: tuple[int, int], name: str) -> None:
    w, h = size
    if w * h > MAX_PIXELS:
        raise ImageError(
            f"{w}x{h} = {w * h:,} pixels is over the limit of {MAX_PIXELS:,} "
            "(refused as a possible decompression bomb)",
            name,
        )
    if w < 1 or h < 1:
        raise ImageError(f"empty image ({w}x{h})", name)


def _orient(img: Image.Image, in_place: bool = False) -> Image.Image:
    """``img`` turned as its EXIF orientation says; ``in_place`` for an image of ours, which is then
    not copied when it needs no turning."""
    try:
        if in_place:
            ImageOps.exif_transpose(img, in_place=True)
            return img
        return ImageOps.exif_transpose(img)
    except Exception:  # a damaged EXIF block must not make a good picture unreadable
        log.debug("EXIF orientation not applied: damaged EXIF block", exc_info=True)
        return img


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        raise ImageError(f"expected a uint8 array, got dtype {arr.dtype}", "array")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageError(f"expected an H×W, H×W×3 or H×W×4 array, got shape {arr.shape}", "array")
    _check_size((arr.shape[1], arr.shape[0]), "array")
    return Image.fromarray(np.ascontiguousarray(arr))
