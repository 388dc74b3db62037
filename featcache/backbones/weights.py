"""Finding a weights file: explicit path, then the torch hub cache, then a checked download."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from featcache.backbones.registry import BackboneEntry, WeightsSource
from featcache.errors import FeatcacheError

_HASH_PREFIX = re.compile(r"-([a-f0-9]{6,})\.")


def hub_checkpoint_dir() -> Path:
    """The folder where torch (and featcache) keep downloaded weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def offline() -> bool:
    """True when the environment forbids downloads (``FEATCACHE_OFFLINE=1``)."""
    return os.environ.get("FEATCACHE_OFFLINE", "").strip().lower() in ("1", "true", "yes")


def resolve_weights(
    entry: BackboneEntry, weights: str, download: bool = True, progress: bool = False
) -> tuple[str, Path]:
    """Return ``(label, path)`` of the weights file for ``weights`` on ``entry``.

    ``weights`` is one of the entry's weights names or a path to a file. The label is the
    weights name, or the absolute path for an explicit file.
    """
    source = entry.weights_source(weights)
    if source is None:
        path = Path(weights).expanduser()
        if path.is_file():
            return str(path.resolve()), path.resolve()
        names = ", ".join(w.name for w in entry.weights)
        raise FeatcacheError(
            f"weights {weights!r} for {entry.name}: not a file and not a known name "
            f"(choose one of {names}, random, or a path to a weights file)"
        )
    if source.bundled is not None:
        path = source.bundled()
        if path is not None and path.is_file():
            return source.name, path
    cached = hub_checkpoint_dir() / source.filename
    if cached.is_file():
        _check_hash_prefix(cached)
        return source.name, cached
    if source.url is None:
        raise FeatcacheError(
            f"{entry.name} weights {source.name} not found: {source.description or source.filename}"
        )
    if not download or offline():
        raise _missing(entry, source, cached, "downloads are disabled")
    cached.parent.mkdir(parents=True, exist_ok=True)
    prefix = _HASH_PREFIX.search(source.filename)
    try:
        torch.hub.download_url_to_file(
            source.url, str(cached), hash_prefix=prefix.group(1) if prefix else None, progress=progress
        )
    except RuntimeError as e:  # torch reports a hash mismatch this way
        raise FeatcacheError(f"download of {source.url} failed its hash check: {e}") from None
    except OSError as e:  # URLError, timeouts, DNS, refused connections
        raise _missing(entry, source, cached, f"download failed: {getattr(e, 'reason', e)}") from None
    return source.name, cached


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_hash_prefix(path: Path) -> None:
    m = _HASH_PREFIX.search(path.name)
    if m and not file_sha256(path).startswith(m.group(1)):
        raise FeatcacheError(
            f"{path} is damaged (its SHA-256 does not start with {m.group(1)}): delete it and retry"
        )


def _missing(entry: BackboneEntry, source: WeightsSource, cached: Path, why: str) -> FeatcacheError:
    return FeatcacheError(
        f"{entry.name} weights {source.name} are not on this machine ({why}); "
        f"download {source.url} and save it as {cached}, or pass --weights PATH"
    )
