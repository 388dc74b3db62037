"""Near-duplicate images, found by the cosine similarity of their embeddings.

Copies of one photo (re-encoded, resized, slightly cropped) have almost the same embedding; when
they fall on both sides of a cross-validation split the score measures memory, not
generalisation, and when a test image copies a training image the test score does.
:func:`similar_pairs` finds the pairs, :func:`near_duplicate_groups` joins them into groups
(which ``fit`` keeps whole within one fold and ``audit`` reports).

The search runs in a few principal directions of the L2-normalised embeddings: projecting onto
an orthonormal basis never lengthens a difference, so every pair within the threshold there is a
candidate, and each candidate is then checked on the full embeddings. The result is exact; the
cost is that of the reduced products (N² × 128 instead of N² × D). Beyond :data:`EXACT_ROWS`
rows, when faiss is installed, the candidates come from an HNSW graph instead (N log N,
approximate: a copy that is not among a row's nearest neighbours there can be missed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache.outliers import unit_rows

SIMILARITY = 0.98
"""Cosine similarity of L2-normalised embeddings from which two images count as near-duplicates.
Chosen on ``bench/audit.py``'s planted copies (JPEG quality 70, resized by ±10 %, cropped by 5 %):
see docs/benchmarks.md."""
COMPONENTS = 128
"""Principal directions the candidate pairs are searched in."""
EXACT_ROWS = 100_000
"""Rows up to which the search compares every pair (blocks of matrix products); beyond, faiss."""
METHODS = ("auto", "blocks", "faiss")


@dataclass(frozen=True)
class SimilarPairs:
    """Pairs of rows with cosine similarity >= the threshold: ``first[k]`` (a row of the first
    matrix) and ``second[k]`` (a row of the second, or of the first with ``first < second``)."""

    first: np.ndarray
    second: np.ndarray
    similarity: np.ndarray

    def __len__(self) -> int:
        return len(self.first)


def similar_pairs(
    X: np.ndarray,
    other: np.ndarray | None = None,
    similarity: float = SIMILARITY,
    method: str = "auto",
    max_block: int = 2**24,
) -> SimilarPairs:
    """The pairs of rows of ``X`` (or of a row of ``X`` and a row of ``other``) whose embeddings
    have cosine similarity >= ``similarity``. ``method``: ``blocks`` compares every pair, in
    blocks of at most ``max_block`` products so memory stays bounded; ``faiss`` searches an HNSW
    graph (approximate); ``auto`` takes blocks up to :data:`EXACT_ROWS` rows, faiss beyond when
    it is installed."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0 < similarity <= 1:
        raise ValueError(f"similarity must be in (0, 1], got {similarity!r}")
    U = _unit32(X)
    V = U if other is None else _unit32(other)
    if U.shape[1] != V.shape[1]:
        raise ValueError(f"the embeddings differ in length: {U.shape[1]} and {V.shape[1]}")
    basis = principal_basis(U)
    P = U @ basis
    Q = P if other is None else V @ basis
    radius = 2 * (1 - similarity) + 1e-4  # squared distance of unit vectors, with float32 slack
    if method == "auto":
        rows = len(U) + (0 if other is None else len(V))
        method = "faiss" if rows > EXACT_ROWS and _has_faiss() else "blocks"
    find = _candidates_faiss if method == "faiss" else _candidates_blocks
    i, j = find(P, Q, other is None, radius, max_block)
    sims = np.empty(len(i), dtype=np.float32)
    for start in range(0, len(i), 8192):
        part = slice(start, start + 8192)
        sims[part] = np.einsum("ij,ij->i", U[i[part]], V[j[part]])
    keep = sims >= similarity
    return SimilarPairs(i[keep], j[keep], sims[keep])


def groups_of(pairs: SimilarPairs, n: int) -> np.ndarray:
    """A group number for each of ``n`` rows: rows joined by a chain of ``pairs`` share one."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs.first, pairs.second)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def near_duplicate_groups(X: np.ndarray, similarity: float = SIMILARITY, method: str = "auto") -> np.ndarray:
    """A group number for each row of N×D embeddings ``X``: rows joined by a chain of pairs with
    cosine similarity >= ``similarity`` share one."""
    return groups_of(similar_pairs(X, similarity=similarity, method=method), len(X))


def _unit32(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D array of embeddings, got shape {X.shape}")
    return unit_rows(X)


def principal_basis(U: np.ndarray, components: int = COMPONENTS, sample: int = 20_000) -> np.ndarray:
    """An orthonormal D×r basis of the ``components`` principal directions of the rows ``U`` (of
    a seeded sample of ``sample`` rows; the identity when D <= r)."""
    d = U.shape[1]
    if d <= components or len(U) <= components:
        return np.eye(d, dtype=np.float32)
    pick = (
        np.arange(len(U))
        if len(U) <= sample
        else np.sort(np.random.default_rng(0).choice(len(U), sample, False))
    )
    rows = U[pick]
    rows -= rows.mean(axis=0)
    _, vectors = np.linalg.eigh((rows.T @ rows).astype(np.float64))
    return np.ascontiguousarray(vectors[:, ::-1][:, :components], dtype=np.float32)


def _candidates_blocks(
    P: np.ndarray, Q: np.ndarray, same: bool, radius: float, max_block: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs within squared distance ``radius`` in the reduced space, every pair compared."""
    # |p - q|² <= radius  <=>  p·q - |q|²/2 >= (|p|² - radius) / 2
    p_bound, q_half = ((P * P).sum(axis=1) - radius) / 2, (Q * Q).sum(axis=1) / 2
    rows, cols = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    step = max(1, max_block // max(len(Q), 1))
    for start in range(0, len(P), step):
        stop = min(start + step, len(P))
        first = start if same else 0  # pairs within one matrix: the upper triangle only
        products = P[start:stop] @ Q[first:].T
        products -= q_half[first:]
        i, j = np.nonzero(products >= p_bound[start:stop, None])
        i, j = i + start, j + first
        keep = i < j if same else slice(None)
        rows.append(i[keep])
        cols.append(j[keep])
    return np.concatenate(rows), np.concatenate(cols)


def _candidates_faiss(
    P: np.ndarray, Q: np.ndarray, same: bool, radius: float, max_block: int, neighbours: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs within squared distance ``radius`` among each row's nearest neighbours in an
    HNSW graph of the reduced rows of ``Q``."""
    import faiss

    index = faiss.IndexHNSWFlat(Q.shape[1], 32)
    index.hnsw.efSearch = 64
    index.add(np.ascontiguousarray(Q))
    k = min(neighbours + (1 if same else 0), len(Q))
    rows, cols = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    step = max(1, max_block // max(k, 1) // 64)
    for start in range(0, len(P), step):
        distances, found = index.search(np.ascontiguousarray(P[start : start + step]), k)
        i, n = np.nonzero((distances <= radius) & (found >= 0))
        i, j = i + start, found[i, n].astype(np.int64)
        if same:
            i, j = np.minimum(i, j), np.maximum(i, j)
            keep = i < j
            i, j = i[keep], j[keep]
        rows.append(i)
        cols.append(j)
    i, j = np.concatenate(rows), np.concatenate(cols)
    if same and len(i):
        i, j = np.unique(np.stack([i, j], axis=1), axis=0).T
    return i, j


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True
