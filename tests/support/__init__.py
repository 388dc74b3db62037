"""Fault injection for featcache's reliability tests and benchmark (not part of the package).

- :func:`hostile_corpus` writes a folder of bad and unusual image files, each described by a
  :class:`HostileFile` that says whether it should decode and to which pixels.
- :func:`run_featcache` and :func:`start_featcache` run the command line in a child process that
  can be made to kill itself at its n-th file rename, to lose files between listing and reading,
  or to run without root's power to read any file.
- :func:`tampered_models` writes damaged, swapped and malicious copies of a model bundle.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: A marker file a malicious model would create; it must never appear.
PWNED = "featcache-pwned-marker"


@dataclass(frozen=True)
class HostileFile:
    """One file of a hostile corpus.

    ``valid`` files must be decoded to ``expected`` (H×W×3 uint8 RGB, before resizing; for JPEGs,
    what Pillow decodes from a clean copy, turned by NumPy where EXIF says so); invalid ones must
    be skipped with a reason. ``decoy`` is a wrong decoding (the photo left unrotated) that the
    cached features must be farther from.
    ``vanishes`` files are deleted between listing and reading by :func:`run_featcache`.
    """

    kind: str
    relpath: str
    valid: bool
    expected: np.ndarray | None = None
    decoy: np.ndarray | None = None
    vanishes: bool = False


def picture(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A distinct, asymmetric h×w×3 uint8 picture: a colour gradient with a dark corner."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = r.integers(0, 256, 3)
    arr = ((base + np.stack([x * 255 // max(w, 1), y * 255 // max(h, 1), (x + y) % 256], -1)) % 256).astype(
        np.uint8
    )
    arr[: max(1, h // 4), : max(1, w // 4)] = 0
    return arr


def labelled_folder(
    root: str | os.PathLike, classes: Sequence[str] = ("a", "b", "c"), per_class: int = 20, seed: int = 0
) -> Path:
    """Write ``root/<class>/<nnn>.jpg``: distinct 64x48 JPEG pictures; return ``root``."""
    root = Path(root)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = picture(64, 48, seed * 100_000 + c * 1000 + i)
            Image.fromarray(arr).save(root / name / f"{i:03d}.jpg", quality=90)
    return root


def _png_with_bad_crc(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    # 8-byte signature, then IHDR: 4 length + 4 type + 13 data + 4 CRC
    crc_at = 8 + 4 + 4 + 13
    (crc,) = struct.unpack(">I", data[crc_at : crc_at + 4])
    data[crc_at : crc_at + 4] = struct.pack(">I", crc ^ 0xFFFFFFFF)
    return bytes(data)


def hostile_corpus(root: str | os.PathLike, folder: str = "odd") -> list[HostileFile]:
    """Write at least 25 kinds of bad or unusual files under ``root/folder`` and describe them."""
    base = Path(root) / folder
    base.mkdir(parents=True, exist_ok=True)
    cases: list[HostileFile] = []

    def put(kind: str, name: str, data: bytes | None = None, **kw) -> Path:
        path = base / name
        if data is not None:
            path.write_bytes(data)
        cases.append(HostileFile(kind, f"{folder}/{name}", **kw))
        return path

    def save(img: Image.Image, name: str, fmt: str, **params) -> bytes:
        path = base / name
        img.save(path, fmt, **params)
        return path.read_bytes()

    def decoded(name: str) -> np.ndarray:
        with Image.open(base / name) as im:
            return np.asarray(im.convert("RGB"))

    photo = picture(96, 64, 1)
    jpeg = save(Image.fromarray(photo), "photo.jpg", "JPEG", quality=95)
    put("plain JPEG", "photo.jpg", valid=True, expected=decoded("photo.jpg"))
    png = save(Image.fromarray(photo), "photo.png", "PNG")
    put("plain PNG", "photo.png", valid=True, expected=photo)

    put("zero-byte file", "empty.jpg", b"", valid=False)
    put("truncated JPEG", "truncated.jpg", jpeg[: len(jpeg) * 6 // 10], valid=False)
    put("truncated PNG", "truncated.png", png[: len(png) * 6 // 10], valid=False)
    put("PNG with a bad CRC", "bad_crc.png", _png_with_bad_crc(photo), valid=False)
    put("text file named .jpg", "notes.jpg", b"these are my holiday notes, not a picture\n" * 20, valid=False)
    trailing = jpeg + bytes(range(7, 250, 3))
    put("JPEG with trailing garbage", "trailing.jpg", trailing, valid=True, expected=decoded("photo.jpg"))

    web = picture(80, 60, 2)
    save(Image.fromarray(web), "webp_named.jpg", "WEBP", lossless=True)
    put("lossless WebP named .jpg", "webp_named.jpg", valid=True, expected=web)

    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 200, 0], [0, 0, 255], [250, 250, 0]], np.uint8)
    idx = (np.add.outer(np.arange(40), np.arange(50)) // 10 % 5).astype(np.uint8)
    frames = [Image.fromarray((idx + k) % 5, "P") for k in range(3)]
    for f in frames:
        f.putpalette(palette.ravel().tolist())
    frames[0].save(base / "animated_named.png", "GIF", save_all=True, append_images=frames[1:], duration=100)
    put("animated GIF named .png", "animated_named.png", valid=True, expected=palette[idx])

    tif = picture(70, 50, 3)
    save(Image.fromarray(tif), "tiff_named.jpeg", "TIFF")
    put("TIFF named .jpeg", "tiff_named.jpeg", valid=True, expected=tif)

    cmyk = Image.fromarray(picture(64, 48, 4)).convert("CMYK")
    save(cmyk, "cmyk.jpg", "JPEG", quality=95)
    put("CMYK JPEG", "cmyk.jpg", valid=True, expected=decoded("cmyk.jpg"))

    deep = (np.add.outer(np.arange(40), np.arange(60)) * 600 % 65536).astype(np.uint16)
    save(Image.fromarray(deep), "sixteen_bit.png", "PNG")
    gray = np.clip(np.rint(deep / 257.0), 0, 255).astype(np.uint8)
    put("16-bit grayscale PNG", "sixteen_bit.png", valid=True, expected=np.repeat(gray[..., None], 3, -1))

    pal = Image.fromarray(idx, "P")
    pal.putpalette(palette.ravel().tolist())
    save(pal, "palette_transparent.png", "PNG", transparency=0)
    white = palette[idx].copy()
    white[idx == 0] = 255
    put("palette PNG with transparency", "palette_transparent.png", valid=True, expected=white)

    la = Image.fromarray(np.stack([gray, np.where(gray > 128, 255, 0).astype(np.uint8)], -1), "LA")
    save(la, "gray_alpha.png", "PNG")
    comp = np.where(gray > 128, gray, 255).astype(np.uint8)
    put("grayscale PNG with alpha", "gray_alpha.png", valid=True, expected=np.repeat(comp[..., None], 3, -1))

    one = np.array([[[200, 30, 90]]], np.uint8)
    save(Image.fromarray(one), "one_pixel.png", "PNG")
    put("1x1 image", "one_pixel.png", valid=True, expected=one)
    line = picture(10000, 1, 5)
    save(Image.fromarray(line), "line.png", "PNG")
    put("10000x1 image", "line.png", valid=True, expected=line)

    save(Image.new("1", (10000, 9000)), "bomb.png", "PNG")
    put("decompression bomb (90 Mpx PNG of 12 KB)", "bomb.png", valid=False)

    upright = picture(48, 64, 6)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    save(Image.fromarray(np.rot90(upright, k=1).copy()), "exif_rotated.jpg", "JPEG", quality=95, exif=exif)
    stored = decoded("exif_rotated.jpg")
    put("EXIF-rotated JPEG", "exif_rotated.jpg", valid=True, expected=np.rot90(stored, k=-1), decoy=stored)
    odd_exif = Image.Exif()
    odd_exif[0x0112] = 42
    bad_tag = picture(40, 30, 7)
    save(Image.fromarray(bad_tag), "exif_nonsense.jpg", "JPEG", quality=95, exif=odd_exif)
    put(
        "EXIF orientation out of range",
        "exif_nonsense.jpg",
        valid=True,
        expected=decoded("exif_nonsense.jpg"),
    )

    unknown = picture(30, 20, 8)
    save(Image.fromarray(unknown), "picture.dat", "PNG")
    put("PNG with an unknown extension", "picture.dat", valid=True, expected=unknown)

    latin = picture(36, 24, 9)
    name = os.fsdecode(b"caf\xe9-latin1.png")
    save(Image.fromarray(latin), name, "PNG")
    put("non-UTF-8 file name", name, valid=True, expected=latin)

    locked = base / "locked.png"
    Image.fromarray(photo).save(locked, "PNG")
    locked.chmod(0)
    put("file without read permission", "locked.png", valid=False)

    os.symlink("does-not-exist.png", base / "dangling.png")
    put("broken symbolic link", "dangling.png", valid=False)
    os.symlink("loop_b.jpg", base / "loop_a.jpg")
    os.symlink("loop_a.jpg", base / "loop_b.jpg")
    put("symbolic link loop", "loop_a.jpg", valid=False)
    cases.append(HostileFile("symbolic link loop", f"{folder}/loop_b.jpg", valid=False))

    os.mkfifo(base / "pipe.jpg")
    put("FIFO named .jpg", "pipe.jpg", valid=False)

    save(Image.fromarray(picture(32, 32, 10)), "vanishing.png", "PNG")
    put("file deleted between listing and reading", "vanishing.png", valid=False, vanishes=True)
    return cases


def kinds(cases: Sequence[HostileFile]) -> list[str]:
    """The distinct kinds of ``cases``, in order."""
    return list(dict.fromkeys(c.kind for c in cases))


_CHILD = r"""
import os, signal, sys
plan = __import__("json").loads(os.environ.pop("FEATCACHE_FAULTS"))
if plan["kill_at_replace"]:
    count = [0]
    def killing(real):
        def step(*a, **kw):
            count[0] += 1
            if count[0] == plan["kill_at_replace"] and plan["when"] == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            real(*a, **kw)
            if count[0] == plan["kill_at_replace"] and plan["when"] == "after":
                os.kill(os.getpid(), signal.SIGKILL)
        return step
    os.replace = killing(os.replace)
    if plan["unlinks_too"]:
        os.unlink = killing(os.unlink)
if plan["vanish"]:
    import featcache.dataset, featcache.extract, featcache.predictor
    real_scan = featcache.dataset.scan
    def scan(root):
        found = real_scan(root)
        for path in plan["vanish"]:
            if os.path.lexists(path):
                os.unlink(path)
        return found
    featcache.extract.scan = featcache.predictor.scan = scan
from featcache.cli import main
sys.argv[0] = "featcache"
main()
"""


def _drop_read_override() -> None:
    """In a root child: give up CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH for what it executes."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def can_honour_permissions() -> bool:
    """Whether a child can be made to respect file permissions (always when not root)."""
    if os.geteuid() != 0:
        return True
    probe = subprocess.run(
        [sys.executable, "-c", "open('/proc/self/status').read()"], preexec_fn=_drop_read_override,
        capture_output=True,
    )  # fmt: skip
    return probe.returncode == 0


def start_featcache(
    args: Sequence[str | os.PathLike],
    kill_at_replace: int | None = None,
    when: str = "before",
    vanish: Sequence[str | os.PathLike] = (),
    honour_permissions: bool = False,
    unlinks_too: bool = False,
    **popen,
) -> subprocess.Popen:
    """Start ``featcache ARGS`` in a child process, with the faults asked for.

    ``kill_at_replace=n`` makes the child SIGKILL itself just ``before`` or ``after`` its n-th
    ``os.replace`` (every file featcache writes whole is renamed into place by one), or with
    ``unlinks_too`` its n-th ``os.replace`` or ``os.unlink`` (file deletions). ``vanish``
    files are deleted right after the dataset folder is listed. ``honour_permissions`` makes a
    root child unable to read files it has no permission for. Other keywords go to Popen.
    """
    plan = {"kill_at_replace": kill_at_replace, "when": when, "vanish": [os.fsdecode(p) for p in vanish],
            "unlinks_too": unlinks_too}  # fmt: skip
    env = {**popen.pop("env", os.environ), "FEATCACHE_FAULTS": json.dumps(plan)}
    cmd = [sys.executable, "-c", _CHILD, *(os.fsdecode(a) for a in args)]
    preexec = _drop_read_override if honour_permissions and os.geteuid() == 0 else None
    return subprocess.Popen(cmd, env=env, preexec_fn=preexec, **popen)


def run_featcache(
    args: Sequence[str | os.PathLike],
    kill_at_replace: int | None = None,
    when: str = "before",
    vanish: Sequence[str | os.PathLike] = (),
    honour_permissions: bool = False,
    timeout: float = 600,
    unlinks_too: bool = False,
    **popen,
) -> subprocess.CompletedProcess:
    """Run ``featcache ARGS`` like :func:`start_featcache` and wait; output is captured as text."""
    proc = start_featcache(
        args, kill_at_replace, when, vanish, honour_permissions, unlinks_too,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", **popen,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\n[killed after {timeout} s]"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class _RunsCode:
    def __reduce__(self):
        return (exec, (f"open({PWNED!r}, 'w').write('model code ran')",))


def tampered_models(
    model: str | os.PathLike, other: str | os.PathLike, folder: str | os.PathLike
) -> dict[str, Path]:
    """Damaged, swapped and malicious copies of the bundle ``model``, each with a manifest beside it.

    ``other`` is a valid bundle fit on another backbone. Keys say what was done; the malicious
    ones, if unpickled, would create the file :data:`PWNED` in the working directory.
    """
    import hashlib
    import pickle

    from featcache.bundle import manifest_path

    model, other, folder = Path(model), Path(other), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = model.read_bytes()
    manifest = manifest_path(model).read_text()
    out: dict[str, Path] = {}

    def place(key: str, payload: bytes, manifest_text: str | None) -> None:
        path = folder / f"{len(out):02d}.joblib"
        path.write_bytes(payload)
        if manifest_text is not None:
            manifest_path(path).write_text(manifest_text)
        out[key] = path

    def forged(payload: bytes) -> str:
        digest = hashlib.sha256(payload).hexdigest()
        return json.dumps({"format": "featcache-model-manifest", "sha256": digest, "size": len(payload)})

    place("truncated to a third", data[: len(data) // 3], manifest)
    place("truncated by one byte", data[:-1], manifest)
    for at in (0.1, 0.5, 0.9):
        flipped = bytearray(data)
        flipped[int(len(data) * at)] ^= 0x10
        place(f"one bit flipped at {int(at * 100)} %", bytes(flipped), manifest)
    place("another model's file, this model's manifest", other.read_bytes(), manifest)
    place("manifest missing", data, None)
    evil = pickle.dumps(_RunsCode())
    place("code-running pickle, no manifest", evil, None)
    place("code-running pickle, this model's manifest", evil, manifest)
    place("code-running pickle, forged manifest", evil, forged(evil))
    wrapped = pickle.dumps({"format": "featcache-model", "format_version": 2, "head": _RunsCode()})
    place("code-running object inside a bundle, forged manifest", wrapped, forged(wrapped))
    twin = folder / "swapped.joblib"
    shutil.copyfile(other, twin)
    shutil.copyfile(manifest_path(other), manifest_path(twin))
    out["another backbone's valid bundle with its manifest"] = twin
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model_path: str | os.PathLike, *args: str, ready_within: float = 120) -> Iterator[str]:
    """Run ``featcache serve`` on 127.0.0.1 and a free port until the block ends; yield its base URL
    once ``/health`` says ready (or fail after ``ready_within`` seconds, showing its output)."""
    import httpx

    port = free_port()
    log = tempfile.TemporaryFile()
    proc = start_featcache(["serve", "--model-path", model_path, "--port", str(port), *args],
                           stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_within
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise AssertionError(
                    f"featcache serve did not get ready:\n{log.read().decode(errors='replace')}"
                )
            try:
                if httpx.get(f"{url}/health", timeout=5).json().get("status") == "ready":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        log.close()


def predict_in_a_new_process(
    model_path: str | os.PathLike, image: str | os.PathLike, env: dict[str, str] | None = None
) -> dict:
    """Load ``model_path`` with :class:`featcache.predictor.Predictor` (CPU) in a fresh Python and
    predict ``image``: its ``probabilities``, the backbone's ``engine`` and ``precision``, and which
    of torch and NNCF the process ``imported``."""
    code = (
        "import sys, json; from featcache.predictor import Predictor\n"
        f"p = Predictor.load({str(model_path)!r}, device='cpu')\n"
        f"proba = p.predict_proba({str(image)!r}).tolist()\n"
        "print(json.dumps({'probabilities': proba, 'engine': p.backbone.engine,\n"
        "                  'precision': p.backbone.identity.precision,\n"
        "                  'imported': [m for m in ('torch', 'nncf') if m in sys.modules]}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])
