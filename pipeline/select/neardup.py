"""Near-duplicates between the priming pool and the target task's images (leak removal).

LAION holds copies of many benchmark images. A pool image that is a copy of a test image
brings that image, with its caption's label, into the classifier: transductive retrieval finds
it first, and accuracy then measures the leak. Before evaluation every pool image whose
embedding has cosine similarity >= ``threshold`` (default 0.95) with a test image (or a shot)
is dropped and counted per class.

Search: each target image asks FAISS (:func:`pipeline.select.knn.search`, exact or IVF as the
``select`` config says) for its ``k`` nearest pool images; a target whose k-th neighbour
still passes the threshold is asked again with twice the ``k`` until one does not, so a
target with many copies loses them all.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.select.knn import KnnConfig, search

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.95


def near_duplicate_pairs(
    pool: np.ndarray,
    targets: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    cfg: KnnConfig | None = None,
    k: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Every (pool row, target row) pair with cosine similarity >= ``threshold``.

    ``pool`` and ``targets`` are unit rows (float16 is fine). Returns two int64 arrays
    ``(pool_idx, target_idx)`` sorted by (pool row, target row).
    """
    p = np.ascontiguousarray(pool, np.float32)
    q = np.ascontiguousarray(targets, np.float32)
    pool_idx, target_idx = [], []
    todo = np.arange(len(q))
    while len(todo) and len(p):
        kk = min(k, len(p))
        scores, idx = search(q[todo], p, kk, cfg)
        hit = (scores >= threshold) & (idx >= 0)
        full = hit[:, -1] & (kk < len(p))  # the k-th still passes: there may be more
        done = ~full
        rows, cols = np.nonzero(hit[done])
        pool_idx.append(idx[done][rows, cols])
        target_idx.append(todo[done][rows])
        todo, k = todo[full], k * 2
    if not pool_idx:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pi, ti = np.concatenate(pool_idx), np.concatenate(target_idx)
    order = np.lexsort((ti, pi))
    return pi[order].astype(np.int64), ti[order].astype(np.int64)


def per_class_counts(labels: np.ndarray, rows: np.ndarray, classnames: list[str]) -> dict:
    """``{class name: count}`` of the pool ``rows`` (labels in ``[0, len(classnames))``),
    only the classes with at least one."""
    n = np.bincount(np.asarray(labels, np.int64)[rows], minlength=len(classnames))
    return {classnames[c]: int(n[c]) for c in np.flatnonzero(n)}
