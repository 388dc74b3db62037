"""Finding the images of a dataset folder, and label maps (folder name → display name, category)."""

from __future__ import annotations

import csv
import json
import os
import stat
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from featcache.errors import FeatcacheError
from featcache.images import NOT_A_FILE

UNLABELLED = -1

GARBAGE26 = {
    "recyclable": [
        "Plastic Bottle", "Hats", "Newspaper", "Cans", "Glassware",
        "Glass Bottle", "Cardboard", "Basketball", "Paper", "Metalware",
    ],
    "dry": [
        "Disposable Chopsticks", "Lighter", "Broom", "Old Mirror",
        "Toothbrush", "Dirty Cloth", "Seashell", "Ceramic Bowl",
    ],
    "hazardous": ["Paint bucket", "Battery", "Fluorescent lamp", "Tablet capsules"],
    "wet": ["Orange Peel", "Vegetable Leaf", "Eggshell", "Banana Peel"],
}  # fmt: skip
PRESETS = ("garbage26",)


@dataclass(frozen=True)
class LabelMap:
    """Folder name → display name and optional category."""

    names: dict[str, str] = field(default_factory=dict)
    categories: dict[str, str] = field(default_factory=dict)

    def display(self, folder: str) -> str:
        return self.names.get(folder, folder)

    def category(self, folder: str) -> str | None:
        return self.categories.get(folder)

    def to_dict(self) -> dict:
        return {"names": self.names, "categories": self.categories}

    @classmethod
    def from_dict(cls, d: dict | None) -> LabelMap:
        d = d or {}
        return cls(dict(d.get("names", {})), dict(d.get("categories", {})))

    def __bool__(self) -> bool:
        return bool(self.names or self.categories)


def load_label_map(spec: str | os.PathLike | None) -> LabelMap:
    """A label map from a preset name (``garbage26``), a ``.json`` or a ``.csv`` file, or None.

    JSON: ``{"folder": "Name"}`` or ``{"folder": {"name": "Name", "category": "cat"}}``.
    CSV: rows ``folder,name[,category]``, with or without a header row.
    """
    if spec is None:
        return LabelMap()
    if str(spec) == "garbage26":
        names, cats = {}, {}
        for major, (category, items) in enumerate(GARBAGE26.items()):
            for minor, name in enumerate(items):
                names[f"{major:02d}_{minor:02d}"] = name
                cats[f"{major:02d}_{minor:02d}"] = category
        return LabelMap(names, cats)
    path = Path(spec)
    if not path.is_file():
        raise FeatcacheError(f"label map {spec}: no such file (or use a preset: {', '.join(PRESETS)})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise FeatcacheError(f"label map {path}: cannot be read ({e})") from None
    if path.suffix.lower() == ".json":
        return _label_map_json(path, text)
    if path.suffix.lower() == ".csv":
        return _label_map_csv(path, text)
    raise FeatcacheError(f"label map {path}: expected a .json or .csv file")


def _label_map_json(path: Path, text: str) -> LabelMap:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise FeatcacheError(f"label map {path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FeatcacheError(f"label map {path}: expected an object mapping folder names to names")
    names, cats = {}, {}
    for folder, value in data.items():
        if isinstance(value, str):
            names[folder] = value
        elif isinstance(value, dict) and isinstance(value.get("name"), str):
            names[folder] = value["name"]
            if value.get("category") is not None:
                cats[folder] = str(value["category"])
        else:
            raise FeatcacheError(
                f'label map {path}: entry {folder!r} must be a name or {{"name": ..., "category": ...}}'
            )
    return LabelMap(names, cats)


def _label_map_csv(path: Path, text: str) -> LabelMap:
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["folder", "name"]:
        rows = rows[1:]
    names, cats = {}, {}
    for i, row in enumerate(rows, 1):
        if len(row) < 2:
            raise FeatcacheError(f"label map {path}: row {i} needs at least folder,name")
        names[row[0].strip()] = row[1].strip()
        if len(row) > 2 and row[2].strip():
            cats[row[0].strip()] = row[2].strip()
    return LabelMap(names, cats)


@dataclass(frozen=True)
class ImageFile:
    """One file found in the dataset folder; ``relpath`` uses ``/`` and may hold undecodable bytes."""

    relpath: str
    label: int
    size: int
    mtime_ns: int


@dataclass
class Dataset:
    """What :func:`scan` found: candidate image files, class folder names, files that could not be
    read (with the reason), and how many files were ignored as not images."""

    root: Path
    folders: list[str]
    files: list[ImageFile]
    unreadable: list[tuple[str, str]]
    ignored: int = 0

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def subset(self, relpaths: Collection[str]) -> Dataset:
        """The same folder with only the files ``relpaths`` (paths as in :attr:`ImageFile.relpath`).

        Raises :class:`FeatcacheError` naming a path that is not one of this dataset's images.
        """
        wanted = set(relpaths)
        known = {f.relpath for f in self.files} | {p for p, _ in self.unreadable}
        missing = sorted(wanted - known)
        if missing:
            raise FeatcacheError(
                f"{len(missing)} of the files asked for are not images under {self.root} ({missing[0]!r})"
            )
        return Dataset(
            self.root,
            self.folders,
            [f for f in self.files if f.relpath in wanted],
            [u for u in self.unreadable if u[0] in wanted],
        )


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def _image_extensions() -> frozenset[str]:
    Image.init()
    return frozenset(Image.registered_extensions())


def _looks_like_image(path: str) -> bool:
    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return False


def scan(root: str | os.PathLike) -> Dataset:
    """List the images under ``root``: ``root/<class>/**`` are labelled, files directly in ``root`` are not.

    Files with an image extension are always candidates (a bad one is skipped later with its
    reason); other files are kept only when Pillow recognises their content. Hidden files and
    folders are ignored; folder symlinks are followed once (loops are cut).
    """
    root = Path(root)
    if not root.is_dir():
        raise FeatcacheError(f"{root}: {'not a folder' if root.exists() else 'no such folder'}")
    extensions = _image_extensions()
    top = sorted(os.scandir(root), key=lambda e: os.fsencode(e.name))
    folders = sorted(e.name for e in top if not _hidden(e.name) and _is_dir(e))
    files: list[ImageFile] = []
    unreadable: list[tuple[str, str]] = []
    ignored = 0

    def consider(abspath: str, relpath: str, label: int) -> None:
        nonlocal ignored
        try:
            st = os.stat(abspath)
        except OSError as e:
            unreadable.append((relpath, os_reason(e, abspath)))
            return
        ext = os.path.splitext(relpath)[1].lower()
        if not stat.S_ISREG(st.st_mode):
            if ext in extensions:  # reading a FIFO or a device could block or never end
                unreadable.append((relpath, NOT_A_FILE))
            return
        if ext not in extensions and not _looks_like_image(abspath):
            ignored += 1
            return
        files.append(ImageFile(relpath, label, st.st_size, st.st_mtime_ns))

    for entry in top:
        if _hidden(entry.name) or _is_dir(entry):
            continue
        consider(entry.path, entry.name, UNLABELLED)
    for label, name in enumerate(folders):
        seen: set[tuple[int, int]] = set()
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:
                dirnames[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
            rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
            for fname in sorted(filenames):
                if not _hidden(fname):
                    consider(os.path.join(dirpath, fname), f"{rel_dir}/{fname}", label)
    files.sort(key=lambda f: os.fsencode(f.relpath))
    unreadable.sort(key=lambda u: os.fsencode(u[0]))
    return Dataset(root, folders, files, unreadable, ignored)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def os_reason(e: OSError, path: str) -> str:
    """What went wrong when ``path`` could not be opened, in a few words."""
    if isinstance(e, FileNotFoundError) and os.path.islink(path):
        return "broken symbolic link"
    return e.strerror or str(e)
