"""Label corrections that ``fit`` applies to a cache's rows without touching the image folder:
a relabel file (``path,given,suggested``, what ``audit --write-relabel`` writes; an empty
``suggested`` leaves the image out) and an exclude file (one path per line, or a CSV file with a
``path`` column). Paths are those of the cache, relative to its image folder."""

from __future__ import annotations

import csv
import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.cache import FeatureCache
from featcache.errors import FeatcacheError, FeatcacheWarning


@dataclass(frozen=True)
class Corrections:
    """New class folders for some images (``relabel``: path -> folder) and images to leave out
    (``exclude``), with the files they were read from."""

    relabel: dict[str, str] = field(default_factory=dict)
    exclude: frozenset[str] = frozenset()
    sources: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.relabel or self.exclude)

    def apply(self, cache: FeatureCache) -> FeatureCache:
        """A copy of ``cache`` with the corrections applied (excluded images become unlabelled, so
        no model sees them); its ``changes["corrections"]`` counts the rows each changed and names
        the files. An unknown class folder is an error; paths that are not in the cache are a
        :class:`FeatcacheWarning`."""
        unknown_classes = sorted(set(self.relabel.values()) - set(cache.folders))
        if unknown_classes:
            raise FeatcacheError(
                f"{', '.join(self.sources)}: class {unknown_classes[0]!r} is not one of the cache's classes "
                f"({', '.join(cache.folders)})"
            )
        column = {folder: k for k, folder in enumerate(cache.folders)}
        row = {p: i for i, p in enumerate(cache.paths)}
        labels = cache.labels.copy()
        relabelled = excluded = 0
        for path, folder in self.relabel.items():
            if path in row and path not in self.exclude and labels[row[path]] != column[folder]:
                labels[row[path]] = column[folder]
                relabelled += 1
        for path in self.exclude:
            if path in row and labels[row[path]] >= 0:
                labels[row[path]] = -1
                excluded += 1
        missing = sorted((set(self.relabel) | self.exclude) - set(row))
        if missing:
            warnings.warn(
                f"{len(missing)} path(s) of {', '.join(self.sources)} are not in the cache "
                f"(first: {missing[0]})",
                FeatcacheWarning,
                stacklevel=2,
            )
        counts = {"relabelled": relabelled, "excluded": excluded, "not_in_cache": len(missing),
                  "files": list(self.sources)}  # fmt: skip
        return dataclasses.replace(
            cache, labels=np.asarray(labels), changes={**cache.changes, "corrections": counts}
        )


def read_corrections(
    relabel: str | os.PathLike | None = None, exclude: str | os.PathLike | None = None
) -> Corrections:
    """The corrections in a relabel file and an exclude file (either may be None)."""
    moves: dict[str, str] = {}
    dropped: set[str] = set()
    if relabel is not None:
        rows = _csv_rows(relabel)
        if not rows or not {"path", "suggested"} <= set(rows[0]):
            raise FeatcacheError(
                f"{relabel}: expected a CSV file with a header row naming the columns path and suggested "
                "(what 'featcache audit --write-relabel' writes)"
            )
        for line in rows:
            path, suggested = (line.get("path") or "").strip(), (line.get("suggested") or "").strip()
            if path and suggested:
                moves[path] = suggested
            elif path:
                dropped.add(path)
    if exclude is not None:
        rows = _csv_rows(exclude) if Path(exclude).suffix.lower() == ".csv" else None
        if rows is not None and rows and "path" in rows[0]:
            dropped |= {(line.get("path") or "").strip() for line in rows} - {""}
        else:
            dropped |= {line.strip() for line in _text(exclude).splitlines() if line.strip()}
    sources = tuple(str(p) for p in (relabel, exclude) if p is not None)
    return Corrections(moves, frozenset(dropped), sources)


def _text(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FeatcacheError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FeatcacheError(f"{path}: cannot be read ({e})") from None


def _csv_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    try:
        return list(csv.DictReader(_text(path).splitlines()))
    except csv.Error as e:
        raise FeatcacheError(f"{path}: not a CSV file ({e})") from None
