"""Early parameter checks for featcache's estimators, with messages that say what is allowed."""

from __future__ import annotations

from typing import Any


def check_params(estimator: Any, checks: list[tuple[str, bool, str]]) -> None:
    """Raise ``ValueError`` for the first ``(name, ok, allowed)`` that is not ok, naming the
    estimator's value and what is allowed."""
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{name} must be {allowed}, got {getattr(estimator, name)!r}")
