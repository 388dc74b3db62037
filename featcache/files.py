"""Files: crash-safe replacement (shared by the cache, the bundle and the reports), output checks
made before long work, and featcache's own cache folder."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from featcache.errors import FeatcacheError


def user_cache_dir() -> Path:
    """featcache's own cache folder (saved traces, converted models): ``$FEATCACHE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/featcache``, else ``~/.cache/featcache``."""
    if os.environ.get("FEATCACHE_CACHE_DIR"):
        return Path(os.environ["FEATCACHE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "featcache"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def writable_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and check that a file can be written in it, before long work
    starts; raises :class:`FeatcacheError` naming the folder otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".featcache-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = "a file is in the way" if isinstance(e, FileExistsError) else e.strerror or str(e)
        raise FeatcacheError(f"{folder}: cannot write there ({reason})") from None
    return folder


@contextmanager
def locked(target: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold the lock of ``target`` (the file ``.NAME.lock`` beside it, removed afterwards) while the
    block runs, so that two processes never write ``target`` at once. When another process holds
    it, raise :class:`FeatcacheError` saying that ``featcache COMMAND`` in that process is writing it."""
    target = Path(target)
    lock = target.with_name(f".{target.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FeatcacheError(f"another featcache {command} is writing {target} (pid {holder})") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed that file as we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def writable_file(path: str | os.PathLike) -> Path:
    """Check that ``path`` can be written (replaced) before long work starts: it is no folder, and
    its folder (created if needed) takes new files. Raises :class:`FeatcacheError` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise FeatcacheError(f"{path} is a folder: name a file to write")
    writable_folder(path.parent)
    return path


@contextmanager
def replaced_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block succeeds, it replaces ``path``.

    The new file is fsync'ed before the rename and the folder after it, so a crash leaves either
    the old file or the new one, never a partial one. On error the temporary file is removed, and
    temporary files left by killed processes are removed before a new one is written.
    """
    path = Path(path)
    _remove_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # never hide the error that brought us here
            tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _remove_stale(path: Path) -> None:
    """Remove the temporary files of ``path`` whose writing process no longer exists."""
    try:
        leftovers = list(path.parent.glob(f".{glob.escape(path.name)}.tmp-*"))
    except OSError:
        return
    for tmp in leftovers:
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would interrupt the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists but belongs to someone else
    return True


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
