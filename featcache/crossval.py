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
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from threadpoolctl import threadpool_limits

if TYPE_CHECKING:
    from featcache.models import Family

_CLIENTS: dict[str, Any] = {}

ChainResult = tuple[list[tuple[np.ndarray, int]], list[tuple[str, type[Warning]]]]
"""What :func:`run_chain` returns: each setting's test logits and unconverged fits, and warnings."""


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
    """What every fit of one family's cross-validation shares: the family (a
    :class:`~featcache.models.Family`, sent to worker processes with it), the pipeline parameters
    fixed on every fit, the seed, and the BLAS threads of each fit (None: the family's)."""

    family: Family
    fixed: dict[str, Any]
    seed: int
    blas_threads: int | None = None


@dataclass(frozen=True)
class Task:
    """Fit ``settings`` (indices into the grid, in chain order) on fold ``fold``."""

    fold: int
    settings: tuple[int, ...]


def chains(grid: list[dict[str, Any]], family: Family) -> list[tuple[int, ...]]:
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


PARALLEL_CELLS = 2**22
"""Feature values (rows x columns) from which a cross-validation is worth worker processes: starting
them takes about a second (a 400-image demo's logreg CV: 1.0 s alone, 1.8 s with them)."""


def local_workers(family: Family, tasks: int, X: Any) -> int:
    """How many processes run ``tasks`` of ``family``'s cross-validation on features ``X`` (an array,
    or maps still on disk) without a scheduler: one per core for a family that fits with one BLAS
    thread (its fits use one core each) on :data:`PARALLEL_CELLS` values or more, else one (this
    process)."""
    from joblib import cpu_count

    if family.blas_threads != 1 or math.prod(X.shape) < PARALLEL_CELLS:
        return 1
    return max(1, min(tasks, cpu_count()))


def run_chain(
    fits: Fits,
    X: Any,
    y: np.ndarray,
    fold: tuple[np.ndarray, np.ndarray],
    settings: list[dict[str, Any]],
    on_epoch: dict[str, Any] | None = None,
) -> ChainResult:
    """Fit each of ``settings`` in turn on the fold's training rows (warm-started along the chain when
    the family allows it; once for the chain, when one fit yields them all); return each one's
    logits on the fold's test rows and how many of its fits stopped before converging (0 or 1),
    and the other warnings of the fits (to be shown where the cross-validation runs)."""
    from sklearn.exceptions import ConvergenceWarning

    from featcache.models import class_logits

    family = fits.family
    train, test = fold
    X_train, y_train, X_test = X[train], y[train], X[test]
    warm = {"clf__warm_start": True} if family.warm_start is not None and len(settings) > 1 else {}
    pipe = family.build(fits.seed).set_params(**fits.fixed, **warm)
    out, others = [], []
    threads = fits.blas_threads if fits.blas_threads is not None else family.blas_threads
    for n, params in enumerate(settings):
        pipe.set_params(**params)
        fitting = n == 0 or family.one_fit is None  # else the first fit holds this setting's model too
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(threads, "blas"):
            warnings.simplefilter("always")
            if fitting:
                pipe.fit(X_train, y_train, **(on_epoch or {}))
            logits = class_logits(pipe, X_test)
        stopped = [issubclass(w.category, ConvergenceWarning) for w in caught]
        others += [(str(w.message), w.category) for w, s in zip(caught, stopped, strict=True) if not s]
        out.append((logits, int(any(stopped)) if fitting else out[0][1]))
    return out, others


def cross_validate_settings(
    fits: Fits,
    X: Any,
    y: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]],
    grid: list[dict[str, Any]],
    on_epoch: dict[str, Any] | None = None,
    scheduler: str | None = None,
) -> tuple[list[np.ndarray], list[int]]:
    """Every setting of ``grid``'s out-of-fold logits (N×K) and its number of unconverged fits.

    ``on_epoch`` (the fit parameter ``clf__on_epoch``, called with a number of epochs done) follows
    the fits when the tasks run in this process one after the other; with a ``scheduler``, or in
    worker processes (see :func:`local_workers`), it is called as each task finishes, with the
    epochs of its fits. Maps still on disk (a
    :class:`~featcache.cache.RowView`) are read by the workers from the cache file, which they must
    see at the same path."""
    family = fits.family
    classes = np.unique(y)
    tasks = [Task(f, chain) for f in range(len(folds)) for chain in chains(grid, family)]
    logits = [np.zeros((len(y), len(classes))) for _ in grid]
    unconverged = [0] * len(grid)
    workers = local_workers(family, len(tasks), X) if scheduler is None else 0
    advance = (on_epoch or {}).get("clf__on_epoch")

    def collect(task: Task, chain: ChainResult) -> None:
        results, others = chain
        for message, category in others:
            warnings.warn(message, category, stacklevel=4)
        test = folds[task.fold][1]
        for i, (z, n) in zip(task.settings, results, strict=True):
            logits[i][test] = z
            unconverged[i] += n
        if advance and workers != 1:  # the fits ran elsewhere: their epochs, now they are done
            advance(family.epochs * (1 if family.one_fit else len(task.settings)))

    def settings_of(task: Task) -> list[dict[str, Any]]:
        return [grid[i] for i in task.settings]

    one_thread = dataclasses.replace(fits, blas_threads=1)  # elsewhere: a worker per core
    if workers == 1:
        for task in tasks:
            collect(task, run_chain(fits, X, y, folds[task.fold], settings_of(task), on_epoch))
        return logits, unconverged
    if workers > 1:
        from joblib import Parallel, delayed

        run = delayed(run_chain)
        # joblib hands large arrays to its worker processes as memory maps of one file
        results = Parallel(n_jobs=workers, return_as="generator")(
            run(one_thread, X, y, folds[t.fold], settings_of(t)) for t in tasks
        )
        for task, result in zip(tasks, results, strict=True):
            collect(task, result)
        return logits, unconverged

    from distributed import as_completed

    from featcache.cache import RowView

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
