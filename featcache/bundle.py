"""The model bundle: a joblib file plus a manifest holding its SHA-256.

joblib (pickle) files run code when they are loaded, so :func:`load_bundle` checks the file's
size and SHA-256 against the manifest beside it *before* unpickling, and refuses a file that is
truncated, modified, or has no manifest. Even a verified file is unpickled with an allowlist:
only NumPy arrays and scikit-learn/featcache estimators may be rebuilt, so a forged manifest
cannot make a bundle run code. Replacing a bundle never leaves a state in which neither the
old nor the new model loads.

The pipeline is pickled inside the bundle as bytes of its own, so a reader that needs only the
plain parts (the identity, the classes, the linear head) does not import scikit-learn.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import json
import os
import pickle
import zlib
from pathlib import Path
from typing import Any

import joblib
from joblib.numpy_pickle import NumpyUnpickler

from featcache import __version__
from featcache.errors import FeatcacheError
from featcache.files import replaced_atomically

FORMAT = "featcache-model"
FORMAT_VERSION = 2


def manifest_path(path: str | os.PathLike) -> Path:
    """Where the manifest of bundle ``path`` lives: ``<path>.manifest.json``."""
    path = Path(path)
    return path.with_name(path.name + ".manifest.json")


def save_bundle(bundle: dict[str, Any], path: str | os.PathLike) -> str:
    """Write ``bundle`` to ``path`` with its manifest; return the file's SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bundle = dict(bundle)
    if "pipeline" in bundle:
        inner = io.BytesIO()
        joblib.dump(bundle.pop("pipeline"), inner)
        bundle["pipeline_pickle"] = inner.getvalue()
    buf = io.BytesIO()
    joblib.dump({"format": FORMAT, "format_version": FORMAT_VERSION, **bundle}, buf, compress=3)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    mpath = manifest_path(path)
    previous = _read_manifest(mpath).get("sha256") if mpath.is_file() and path.is_file() else None
    # The manifest accepts both files while the new one is renamed into place.
    _write_atomic(mpath, _manifest(path, digest, len(data), previous))
    _write_atomic(path, data)
    _write_atomic(mpath, _manifest(path, digest, len(data), None))
    return digest


def load_bundle(path: str | os.PathLike, pipeline: bool = True) -> dict[str, Any]:
    """Check ``path`` against its manifest, then unpickle it; a clear error for anything else.

    With ``pipeline`` false, the scikit-learn pipeline stays pickled (see :func:`bundle_pipeline`).
    """
    path = Path(path)
    if not path.is_file():
        raise FeatcacheError(f"{path}: no such model (run 'featcache fit' first, or pass --model-path)")
    mpath = manifest_path(path)
    if not mpath.is_file():
        raise FeatcacheError(
            f"{path}: no manifest ({mpath.name}) beside it; refusing to unpickle an unverified file"
        )
    manifest = _read_manifest(mpath)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    accepted = {manifest.get("sha256"), manifest.get("previous_sha256")} - {None}
    if digest not in accepted:
        raise FeatcacheError(
            f"{path}: SHA-256 {digest[:12]}… does not match its manifest ({len(data)} bytes, expected "
            f"{manifest.get('size')}): the file is truncated, modified or not the one that was saved; "
            "refusing to unpickle it"
        )
    try:
        bundle = safe_load(data)
    except UnsafePickleError as e:
        raise FeatcacheError(f"{path}: refusing to load it: {e}") from None
    except Exception as e:  # noqa: BLE001 - a verified file that still fails to load
        raise FeatcacheError(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise FeatcacheError(f"{path}: not a featcache model")
    if bundle.get("format_version", 0) > FORMAT_VERSION:
        raise FeatcacheError(
            f"{path}: made by a newer featcache ({bundle.get('featcache_version')}); upgrade"
        )
    if pipeline and "pipeline_pickle" in bundle:
        bundle["pipeline"] = bundle_pipeline(bundle)
    return bundle


def bundle_pipeline(bundle: dict[str, Any]) -> Any:
    """The fitted scikit-learn pipeline of a bundle from :func:`load_bundle` (unpickled on first use)."""
    if "pipeline" not in bundle:
        if "pipeline_pickle" not in bundle:
            raise FeatcacheError("the model bundle holds no pipeline")
        try:
            bundle["pipeline"] = safe_load(bundle["pipeline_pickle"])
        except UnsafePickleError as e:
            raise FeatcacheError(f"refusing to load the model's pipeline: {e}") from None
        except Exception as e:  # noqa: BLE001 - the file was verified, so this is a version mismatch
            raise FeatcacheError(f"the model's pipeline cannot be loaded ({type(e).__name__}: {e})") from None
    return bundle["pipeline"]


def _manifest(path: Path, digest: str, size: int, previous: str | None) -> bytes:
    m = {"format": FORMAT + "-manifest", "file": path.name, "sha256": digest, "size": size,
         "featcache_version": __version__}  # fmt: skip
    if previous and previous != digest:
        m["previous_sha256"] = previous
    return (json.dumps(m, indent=2) + "\n").encode()


def _read_manifest(mpath: Path) -> dict[str, Any]:
    try:
        m = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FeatcacheError(f"{mpath}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT + "-manifest":
        raise FeatcacheError(f"{mpath}: not a featcache manifest")
    return m


def _write_atomic(path: Path, data: bytes) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_bytes(data)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asks for something a featcache model never holds."""


#: What a bundle may rebuild besides scikit-learn and featcache estimators.
SAFE_GLOBALS = frozenset(
    {
        ("joblib.numpy_pickle", "NumpyArrayWrapper"),
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("sklearn.calibration", "_CalibratedClassifier"),
        ("collections", "OrderedDict"),
    }
)
_ESTIMATOR_PACKAGES = ("sklearn", "featcache")
# joblib >= 1.5 takes ensure_native_byte_order; older versions always convert
_UNPICKLER_OPTIONS = (
    {"ensure_native_byte_order": True}
    if "ensure_native_byte_order" in inspect.signature(NumpyUnpickler.__init__).parameters
    else {}
)


class _AllowlistUnpickler(NumpyUnpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        if _is_estimator_class(module, name):
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"it asks for {module}.{name}, which is not part of any featcache model "
            "(a pickle that names it could run code)"
        )


def _is_estimator_class(module: str, name: str) -> bool:
    """Whether ``module.name`` is a scikit-learn or featcache estimator class defined there."""
    if module.split(".")[0] not in _ESTIMATOR_PACKAGES or "." in name:
        return False
    from sklearn.base import BaseEstimator

    try:
        obj = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return False
    home = getattr(obj, "__module__", None) or ""
    return (
        isinstance(obj, type) and issubclass(obj, BaseEstimator) and home.split(".")[0] in _ESTIMATOR_PACKAGES
    )


def safe_load(data: bytes) -> Any:
    """Unpickle joblib ``data`` (plain or zlib-compressed), rebuilding only allowlisted types.

    Raises :class:`UnsafePickleError` for anything else, before it can be called.
    """
    if data[:1] == b"x":  # joblib's zlib stream (compress=1..9)
        data = zlib.decompress(data)
    elif data[:1] != b"\x80":
        raise pickle.UnpicklingError("not a pickle or a zlib-compressed joblib file")
    return _AllowlistUnpickler("", io.BytesIO(data), **_UNPICKLER_OPTIONS).load()
