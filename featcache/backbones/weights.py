"""Finding a weights file: explicit path, then the torch hub cache, then a checked download.

Nothing here imports torch: the hub folder is found the way torch finds it.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

from featcache.backbones.entry import BackboneEntry, WeightsSource
from featcache.backbones.registry import get_entry, list_backbones
from featcache.errors import FeatcacheError
from featcache.files import file_sha256, replaced_atomically

_HASH_PREFIX = re.compile(r"-([a-f0-9]{6,})\.")

DownloadProgress = Callable[[int, int | None], None]
"""Called with the bytes received so far and the total (None when the server does not say)."""


class WeightsUnavailableError(FeatcacheError):
    """A backbone's weights are not on this machine and could not be downloaded."""


def hub_checkpoint_dir() -> Path:
    """The folder where torch (and featcache) keep downloaded weights: ``$TORCH_HOME/hub/checkpoints``
    (``$XDG_CACHE_HOME/torch`` or ``~/.cache/torch`` when ``TORCH_HOME`` is not set)."""
    if "torch" in sys.modules:  # honours torch.hub.set_dir() in the caller's process
        return Path(sys.modules["torch"].hub.get_dir()) / "checkpoints"
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    home = os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))
    return Path(home) / "hub" / "checkpoints"


def offline() -> bool:
    """True when the environment forbids downloads (``FEATCACHE_OFFLINE=1``)."""
    return os.environ.get("FEATCACHE_OFFLINE", "").strip().lower() in ("1", "true", "yes")


def resolve_weights(
    entry: BackboneEntry, weights: str, download: bool = True, on_progress: DownloadProgress | None = None
) -> tuple[str, Path]:
    """Return ``(label, path)`` of the weights file for ``weights`` on ``entry``.

    ``weights`` is one of the entry's weights names or a path to a file. The label is the
    weights name, or the absolute path for an explicit file. A download reports its bytes to
    ``on_progress``.
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
    local = _local_file(source)
    if local is not None:
        return source.name, local
    cached = hub_checkpoint_dir() / source.filename
    if source.url is None:
        raise WeightsUnavailableError(
            f"{entry.name} weights {source.name} not found: {source.description or source.filename}"
        )
    if not download or offline():
        raise _missing(entry, source, cached, "downloads are disabled")
    try:
        if source.fetch is not None:
            return source.name, source.fetch()
        _download(source.url, cached, on_progress)
    except FeatcacheError:
        raise
    except Exception as e:  # URLError, timeouts, DNS, a full disk, the Hub client's errors
        why = str(getattr(e, "reason", None) or e).strip().splitlines() or [type(e).__name__]
        raise _missing(entry, source, cached, f"download failed: {why[0][:200]}") from None
    return source.name, cached


def installed_backbones() -> list[str]:
    """The registered backbones whose default weights are on this machine (no download needed)."""
    out = []
    for name in list_backbones():
        entry = get_entry(name)
        try:
            if _local_file(entry.weights[0]) is not None:
                out.append(name)
        except FeatcacheError:
            continue  # a damaged file is no help
    return out


def _local_file(source: WeightsSource) -> Path | None:
    if source.bundled is not None:
        path = source.bundled()
        if path is not None and path.is_file():
            return path
    cached = hub_checkpoint_dir() / source.filename
    if cached.is_file():
        _check_hash_prefix(cached)
        return cached
    return None


def _download(url: str, destination: Path, on_progress: DownloadProgress | None) -> None:
    """Fetch ``url`` into ``destination`` whole, checking the hash prefix its file name carries."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    prefix = _HASH_PREFIX.search(destination.name)
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response, replaced_atomically(destination) as tmp:
        total = response.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        done = 0
        with open(tmp, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
                digest.update(block)
                done += len(block)
                if on_progress:
                    on_progress(done, total)
        if prefix and not digest.hexdigest().startswith(prefix.group(1)):
            raise FeatcacheError(
                f"download of {url} failed its hash check: SHA-256 {digest.hexdigest()[:12]}… "
                f"does not start with {prefix.group(1)}"
            )


def _check_hash_prefix(path: Path) -> None:
    m = _HASH_PREFIX.search(path.name)
    if m and not file_sha256(path).startswith(m.group(1)):
        raise FeatcacheError(
            f"{path} is damaged (its SHA-256 does not start with {m.group(1)}): delete it and retry"
        )


def _missing(entry: BackboneEntry, source: WeightsSource, cached: Path, why: str) -> WeightsUnavailableError:
    installed = [name for name in installed_backbones() if name != entry.name]
    other = f", or use backbone={installed[0]!r}, whose weights are installed here" if installed else ""
    return WeightsUnavailableError(
        f"{entry.name} weights {source.name} are not on this machine ({why}); "
        f"download {source.url} and save it as {cached}, or pass weights=PATH{other}"
    )
