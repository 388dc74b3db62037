"""The model bundle: a joblib file plus a manifest holding its SHA-256.

joblib (pickle) files run code when they are loaded, so :func:`load_bundle` checks the file's
size and SHA-256 against the manifest beside it *before* unpickling, and refuses a file that is
truncated, modified, or has no manifest. Even a verified file is unpickled with an allowlist:
only NumPy arrays and scikit-learn/featcache estimators may be rebuilt, so a forged manifest
cannot make a bundle run code. Replacing a bundle never leaves a state in which neither the
old nor the new model loads.

The pipeline is pickled inside the bundle as bytes of its own, so a reader that needs only the
plain parts (the identity, the class folders, the linear head) does not import scikit-learn.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import io
import json
import os
import pickle
import warnings
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from joblib.numpy_pickle import NumpyUnpickler

from featcache._version import __version__
from featcache.backbones.identity import BackboneIdentity, tuned_id
from featcache.choices import DEFAULT_MODEL, PRECISIONS
from featcache.dataset import LabelMap
from featcache.errors import FeatcacheError, FeatcacheWarning
from featcache.files import replaced_atomically
from featcache.head import LinearHead
from featcache.outliers import OutlierScore

FORMAT = "featcache-model"
FORMAT_VERSION = 4
MODEL_FILE = "best.joblib"


@dataclass(eq=False)
class ModelBundle:
    """A fitted model with everything needed to apply it.

    ``folders`` are the class folder names in the column order of :meth:`predict_proba`, and
    ``names`` their display names from ``label_map``. ``identity`` is the backbone the features
    came from and ``feature_dtype`` how they were stored. ``head`` is the pipeline as plain
    NumPy arrays (present when it reproduces the pipeline), so predicting needs no scikit-learn;
    ``pipeline`` is the fitted scikit-learn pipeline, unpickled on first use.

    ``fit_identity`` is the identity of the cache the model was fit on, whose rows its
    ``pipeline`` takes (by default ``identity``). A ``finetune`` model's is a cache with feature
    maps; it also holds ``top``, the fine-tuned weights of the network after stage
    ``identity.tuned_stage`` as arrays: its backbone is built with them, and ``head`` is its new
    linear layer on their pooled output.

    ``outlier`` scores how unlike the training images an image's features are (an
    :class:`~featcache.outliers.OutlierScore` with its threshold); bundles fit before featcache
    had one, and fine-tuned ones, have None.
    """

    family: str
    folders: list[str]
    identity: BackboneIdentity
    label_map: LabelMap = field(default_factory=LabelMap)
    feature_dtype: str = "float32"
    head: LinearHead | None = None
    report: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    featcache_version: str = __version__
    pipeline_pickle: bytes | None = field(default=None, repr=False)
    top: dict[str, np.ndarray] | None = field(default=None, repr=False)
    fit_identity: BackboneIdentity | None = None
    outlier: OutlierScore | None = None
    _pipeline: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.fit_identity is None:
            self.fit_identity = self.identity if self.top is None else self._legacy_fit_identity()
        if self.head is not None and self.head.n_classes != len(self.folders):
            raise FeatcacheError("the model bundle is inconsistent: its head does not fit its classes")
        if self.outlier is not None and (
            self.outlier.n_classes != len(self.folders)
            or (self.head is not None and self.outlier.n_features != self.head.coef.shape[1])
        ):
            raise FeatcacheError(
                "the model bundle is inconsistent: its outlier score does not fit its features"
            )
        if bool(self.top) != bool(self.identity.tuned):
            raise FeatcacheError(
                "the model bundle is inconsistent: fine-tuned weights without their identity"
            )
        if self.top is not None and tuned_id(self.identity.tuned_stage, self.top) != self.identity.tuned:
            raise FeatcacheError(
                "the model bundle is inconsistent: its fine-tuned weights are not the recorded ones"
            )

    def _legacy_fit_identity(self) -> BackboneIdentity:
        """The fit identity of a fine-tuned bundle saved before bundles recorded it: its estimator's."""
        clf = self.pipeline.steps[-1][1]
        return BackboneIdentity.from_dict(getattr(clf, "estimator_", clf).identity)

    @classmethod
    def with_pipeline(cls, pipeline: Any, **fields: Any) -> ModelBundle:
        """A bundle holding the fitted ``pipeline`` (pickled now, so that it is saved as fitted)."""
        inner = io.BytesIO()
        joblib.dump(pipeline, inner)
        bundle = cls(**fields, pipeline_pickle=inner.getvalue())
        bundle._pipeline = pipeline
        return bundle

    @property
    def names(self) -> list[str]:
        return [self.label_map.display(f) for f in self.folders]

    @property
    def pipeline(self) -> Any:
        """The fitted scikit-learn pipeline (unpickled with the allowlist on first use)."""
        if self._pipeline is None:
            if self.pipeline_pickle is None:
                raise FeatcacheError("the model bundle holds no pipeline")
            try:
                pipeline = safe_load(self.pipeline_pickle)
            except UnsafePickleError as e:
                raise FeatcacheError(f"refusing to load the model's pipeline: {e}") from None
            except Exception as e:  # the file was verified, so this is a version mismatch
                raise FeatcacheError(
                    f"the model's pipeline cannot be loaded ({type(e).__name__}: {e})"
                ) from None
            if [str(c) for c in pipeline.classes_] != self.folders:
                raise FeatcacheError(
                    "the model bundle is inconsistent: its classes differ from its pipeline's"
                )
            self._pipeline = pipeline
        return self._pipeline

    def card(self) -> dict[str, Any]:
        """The model card, plain JSON data: classes, backbone, the CV accuracy of the model and of
        every family cross-validated beside it, when and by which featcache it was fit."""
        report = self.report or {}
        families = {
            name: {
                k: r.get(k)
                for k in (
                    "cv_accuracy_mean",
                    "cv_accuracy_std",
                    "cv_balanced_accuracy_mean",
                    "cv_f1_macro_mean",
                    "min_recall",
                    "best_params",
                )
            }
            for name, r in report.get("families", {}).items()
        }
        best = families.get(report.get("best"), {})
        ident = self.identity
        return {
            "family": self.family,
            "best": report.get("best"),
            "classes": [{"folder": f, "name": name, "category": self.label_map.category(f)}
                        for f, name in zip(self.folders, self.names, strict=True)],
            "backbone": {"name": ident.backbone, "weights": ident.weights, "layers": ident.layers,
                         "pool": ident.pool, "feature_dim": ident.feature_dim, "precision": ident.precision,
                         "input_size": ident.preprocessing.size, "fine_tuned_after_stage": ident.tuned_stage},
            "cv_accuracy": best.get("cv_accuracy_mean"),
            "cv_accuracy_std": best.get("cv_accuracy_std"),
            "cv_folds": report.get("cv"),
            "selected_by": report.get("select_by", "accuracy"),
            "ood_threshold": None if self.outlier is None else self.outlier.threshold,
            "n_images": report.get("n_images"),
            "families": families,
            "fit_at": self.created,
            "featcache_version": self.featcache_version,
        }  # fmt: skip

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """N×D features → N×K class probabilities (float64), columns in the order of ``folders``."""
        if self.head is not None:
            return self.head.predict_proba(features)
        return np.asarray(self.pipeline.predict_proba(features), dtype=np.float64)

    def ood_score(self, features: np.ndarray) -> np.ndarray | None:
        """How unlike the training images each row of N×D features is (see
        :class:`~featcache.outliers.OutlierScore`), or None when the model has no such score."""
        return None if self.outlier is None else self.outlier.score(features)

    def predict(self, features: np.ndarray) -> list[str]:
        """The most probable class folder of each row of N×D features."""
        return [self.folders[i] for i in self.predict_proba(features).argmax(axis=1)]

    def predict_cached(self, rows: np.ndarray) -> list[str]:
        """The most probable class folder of each of ``rows``, as a cache of :attr:`fit_identity`
        holds them (what the model was fit on: pooled features, or a fine-tuned model's maps)."""
        if self.fit_identity == self.identity:
            return self.predict(rows)
        return [str(c) for c in self.pipeline.predict(rows)] if len(rows) else []

    def backbone(self, precision: str | None = None, **options: Any) -> Any:
        """The backbone that makes this model's features from pixels, built by
        :func:`featcache.backbones.build.build_backbone` with ``options`` (device, engine, ...).
        ``precision`` (None: the one the model was fit with) runs it in another arithmetic, with a
        warning: the features then differ from the ones the model learnt from."""
        from featcache.backbones.build import build_backbone

        identity = self.identity
        if precision is not None and precision not in PRECISIONS:
            raise FeatcacheError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision is not None and precision != identity.precision:
            warnings.warn(
                f"the model was fit on {identity.precision} features and its backbone runs in {precision} "
                "here: the features differ slightly from the ones it learnt from (evaluating the model "
                "on a labelled folder with the same precision says what that costs)",
                FeatcacheWarning,
                stacklevel=3,
            )
            identity = dataclasses.replace(identity, precision=precision)
        return build_backbone(identity, top=self.top, **options)

    def to_dict(self) -> dict[str, Any]:
        """The bundle as plain types (what is pickled)."""
        return {
            "format": FORMAT,
            # a featcache that predates fine-tuning would ignore the fine-tuned weights: it must refuse
            "format_version": FORMAT_VERSION if self.top is not None else 3,
            "family": self.family,
            "folders": list(self.folders),
            "identity": self.identity.to_dict(),
            "label_map": self.label_map.to_dict(),
            "feature_dtype": self.feature_dtype,
            "head": self.head.to_dict() if self.head is not None else None,
            "report": self.report,
            "created": self.created,
            "featcache_version": self.featcache_version,
            "pipeline_pickle": self.pipeline_pickle,
            "top": self.top,
            "fit_identity": self.fit_identity.to_dict(),
            "outlier": None if self.outlier is None else self.outlier.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelBundle:
        """Read :meth:`to_dict`'s form, and format 2's (which called the folders ``classes``)."""
        return cls(
            family=d["family"],
            folders=[str(f) for f in d["folders" if "folders" in d else "classes"]],
            identity=BackboneIdentity.from_dict(d["identity"]),
            label_map=LabelMap.from_dict(d.get("label_map")),
            feature_dtype=d.get("feature_dtype", "float32"),
            head=LinearHead.from_dict(d["head"]) if d.get("head") else None,
            report=d.get("report", {}),
            created=d.get("created", ""),
            featcache_version=d.get("featcache_version", ""),
            pipeline_pickle=d.get("pipeline_pickle"),
            top={str(k): np.asarray(v) for k, v in d["top"].items()} if d.get("top") else None,
            fit_identity=BackboneIdentity.from_dict(d["fit_identity"]) if d.get("fit_identity") else None,
            outlier=OutlierScore.from_dict(d["outlier"]) if d.get("outlier") else None,
        )


def manifest_path(path: str | os.PathLike) -> Path:
    """Where the manifest of bundle ``path`` lives: ``<path>.manifest.json``."""
    path = Path(path)
    return path.with_name(path.name + ".manifest.json")


def resolve_model_path(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/best.joblib`` when ``path`` is a folder (what ``fit`` wrote)."""
    path = Path(path)
    return path / MODEL_FILE if path.is_dir() else path


def save_bundle(bundle: ModelBundle, path: str | os.PathLike) -> str:
    """Write ``bundle`` to ``path`` with its manifest; return the file's SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    joblib.dump(bundle.to_dict(), buf, compress=3)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    mpath = manifest_path(path)
    previous = _read_manifest(mpath).get("sha256") if mpath.is_file() and path.is_file() else None
    # The manifest accepts both files while the new one is renamed into place.
    _write_atomic(mpath, _manifest(path, digest, len(data), previous))
    _write_atomic(path, data)
    _write_atomic(mpath, _manifest(path, digest, len(data), None))
    return digest


def load_bundle(path: str | os.PathLike = DEFAULT_MODEL) -> ModelBundle:
    """Check ``path`` (a model file, or the folder ``fit`` wrote) against its manifest, then
    unpickle it; a clear error for anything else. The pipeline stays pickled until it is used."""
    path = resolve_model_path(path)
    if not path.is_file():
        raise FeatcacheError(f"{path}: no such model (fit one first, or pass model_path=PATH)")
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
        content = safe_load(data)
    except UnsafePickleError as e:
        raise FeatcacheError(f"{path}: refusing to load it: {e}") from None
    except Exception as e:  # a verified file that still fails to load
        raise FeatcacheError(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise FeatcacheError(f"{path}: not a featcache model")
    if content.get("format_version", 0) > FORMAT_VERSION:
        raise FeatcacheError(
            f"{path}: made by a newer featcache ({content.get('featcache_version')}); upgrade"
        )
    try:
        return ModelBundle.from_dict(content)
    except (KeyError, TypeError, ValueError) as e:
        raise FeatcacheError(f"{path}: not a complete featcache model ({type(e).__name__}: {e})") from None


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
