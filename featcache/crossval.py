"""Cross-validating a family's grid as independent tasks: one fold and one *chain* of settings each.

A chain is the settings that differ only in the family's warm-start parameter (e.g. ``C``), in
ascending order: each fit starts from the solution of the one before on the same fold, which
takes a fraction of the iterations of a fit from zero and reaches the same optimum (the problems
are convex). A family without one has chains of one setting. The tasks run in this process, or
on a Dask cluster (``scheduler``: ``local``, ``local:N`` or ``tcp://HOST:PORT``) with the
features sent to each worker once; either way the results are put together in grid order.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

_CLIENTS: dict[str, Any] = {}


@contextmanager
def cluster(scheduler: str | None) -> Iterator[Any]:
    """The Dask client of ``scheduler`` (None: none), started once for the block: every
    cross-validation in it runs on that cluster."""
    if scheduler is None:
        yield None
    elif scheduler in _CLIENTS:
        yield _CLIENTS[scheduler]
    else:
        from featcache.distributed import dask_client

        with dask_client(scheduler) as client:
            _CLIENTS[scheduler] = client
            try:
                yield client
            finally:
                del _CLIENTS[scheduler]


@dataclass(frozen=True)
class Fits:
    """What every fit of one family's cross-validation shares: the family, the pipeline parameters
    fixed on every fit, the seed, and the BLAS threads of each fit (None: the family's)."""

    family: str
    fixed: dict[str, Any]
    seed: int
    blas_threads: int | None = None


@dataclass(frozen=True)
class Task:
    """Fit ``settings`` (indices into the grid, in chain order) on fold ``fold``."""

    fold: int
    settings: tuple[int, ...]


def chains(grid: list[dict[str, Any]], family: Any) -> list[tuple[int, ...]]:
    """The grid's settings (indices) in chains: those equal but for the family's ``warm_start``
    parameter (ascending in it) or its ``one_fit`` parameter (in the family's grid order)."""
    along = family.warm_start or family.one_fit
    if along is None:
        return [(i,) for i in range(len(grid))]
    keyed: dict[tuple, list[int]] = {}
    for i, params in enumerate(grid):
        rest = tuple(sorted((k, repr(v)) for k, v in params.items() if k != along))
        keyed.setdefault(rest, []).append(i)
    if family.one_fit:
        order = family.grid.get(along, [])
        rank = lambda i: order.index(grid[i][along]) if grid[i].get(along) in order else len(order)  # noqa: E731
    else:
        rank = lambda i: grid[i].get(along, 0)  # noqa: E731
    return [tuple(sorted(chain, key=rank)) for chain in keyed.values()]


def run_chain(
    fits: Fits,
    X: Any,
    y: np.ndarray,
    fold: tuple[np.ndarray, np.ndarray],
    settings: list[dict[str, Any]],
    on_epoch: dict[str, Any] | None = None,
) -> list[tuple[np.ndarray, int]]:
    """Fit each of ``settings`` in turn on the fold's training rows (warm-started along the chain when
    the family allows it; once for the chain, when one fit yields them all); return each one's
    logits on the fold's test rows and how many of its fits stopped before converging (0 or 1)."""
    from sklearn.exceptions import ConvergenceWarning

    from featcache.families import FAMILIES
    from featcache.models import class_logits

    family = FAMILIES[fits.family]
    train, test = fold
    X_train, y_train, X_test = X[train], y[train], X[test]
    warm = {"clf__warm_start": True} if family.warm_start is not None and len(settings) > 1 else {}
    pipe = family.build(fits.seed).set_params(**fits.fixed, **warm)
    out = []
    threads = fits.blas_threads if fits.blas_threads is not None else family.blas_threads
    for n, params in enumerate(settings):
        pipe.set_params(**params)
        if n > 0 and family.one_fit is not None:  # the first fit holds this setting's model too
            out.append((class_logits(pipe, X_test), out[0][1]))
            continue
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(threads, "blas"):
            warnings.simplefilter("always")
            pipe.fit(X_train, y_train, **(on_epoch or {}))
        unconverged = any(issubclass(w.category, ConvergenceWarning) for w in caught)
        for w in caught:
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        out.append((class_logits(pipe, X_test), int(unconverged)))
    return out


def cross_validate_settings(
    fits: Fits,
    X: Any,
    y: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]],
    grid: list[dict[str, Any]],
    on_epoch: dict[str, Any] | None = None,
    scheduler: str | None = None,
    on_task: Callable[[Task], None] | None = None,
) -> tuple[list[np.ndarray], list[int]]:
    """Every setting of ``grid``'s out-of-fold logits (N×K) and its number of unconverged fits.

    ``on_epoch`` (fit parameters that follow the epochs) is used in this process only; with a
    ``scheduler``, ``on_task`` is called as each task finishes instead. Maps still on disk (a
    :class:`~featcache.cache.RowView`) are read by the workers from the cache file, which they must
    see at the same path."""
    from featcache.families import FAMILIES

    family = FAMILIES[fits.family]
    classes = np.unique(y)
    tasks = [Task(f, chain) for f in range(len(folds)) for chain in chains(grid, family)]
    logits = [np.zeros((len(y), len(classes))) for _ in grid]
    unconverged = [0] * len(grid)

    def collect(task: Task, results: list[tuple[np.ndarray, int]]) -> None:
        test = folds[task.fold][1]
        for i, (z, n) in zip(task.settings, results, strict=True):
            logits[i][test] = z
            unconverged[i] += n
        if on_task:
            on_task(task)

    def settings_of(task: Task) -> list[dict[str, Any]]:
        return [grid[i] for i in task.settings]

    if scheduler is None:
        for task in tasks:
            collect(task, run_chain(fits, X, y, folds[task.fold], settings_of(task), on_epoch))
        return logits, unconverged

    from distributed import as_completed

    from featcache.cache import RowView

    one_thread = dataclasses.replace(fits, blas_threads=1)  # a worker per core
    with cluster(scheduler) as client:
        y_there = client.scatter(y, broadcast=True)
        X_there = X if isinstance(X, RowView) else client.scatter(np.asarray(X), broadcast=True)
        run = lambda t: client.submit(  # noqa: E731
            run_chain, one_thread, X_there, y_there, folds[t.fold], settings_of(t), pure=False
        )
        futures = {run(t): t for t in tasks}
        for future in as_completed(futures):
            collect(futures[future], future.result())
    return logits, unconverged
