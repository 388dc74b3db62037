"""How two recorded settings differ, as data: compared by field, worded only where it is shown."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple


class Difference(NamedTuple):
    """One field in which this side's settings differ from the other's."""

    field: str
    mine: Any
    theirs: Any

    def __str__(self) -> str:
        return f"{self.field}: {self.mine} vs {self.theirs}"


def worded(differences: Iterable[Difference]) -> str:
    """The differences as one phrase for a message: ``layers: last vs multi; precision: ...``."""
    return "; ".join(map(str, differences))
