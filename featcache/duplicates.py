"""Near-duplicate images, found by the cosine similarity of their embeddings.

Copies of one photo (re-encoded, resized, slightly cropped) have almost the same embedding; when
they fall on both sides of a cross-validation split the score measures memory, not
generalisation. :func:`near_duplicate_groups` joins them into groups, which ``fit`` keeps whole
within one fold.
"""

from __future__ import annotations

import numpy as np

SIMILARITY = 0.98
"""Cosine similarity of L2-normalised embeddings from which two images count as near-duplicates."""


def near_duplicate_groups(
    X: np.ndarray, similarity: float = SIMILARITY, max_block: int = 2**25
) -> np.ndarray:
    """A group number for each row of N×D embeddings ``X``: rows joined by a chain of pairs with
    cosine similarity >= ``similarity`` share one. Compared in blocks of at most ``max_block``
    similarities at a time, so memory stays bounded (the time grows with N²)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    X = np.asarray(X, dtype=np.float32)
    n = len(X)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    unit = X / np.maximum(norms, 1e-12)
    rows, cols = [], []
    step = max(1, max_block // max(n, 1))
    for start in range(0, n, step):
        sims = unit[start : start + step] @ unit.T
        i, j = np.nonzero(sims >= similarity)
        keep = i + start < j  # each pair once, no row with itself
        rows.append(i[keep] + start)
        cols.append(j[keep])
    i, j = (np.concatenate(rows), np.concatenate(cols)) if rows else (np.zeros(0, int), np.zeros(0, int))
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]
