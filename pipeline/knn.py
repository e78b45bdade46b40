"""Top-k inner-product search with FAISS (exact or IVF, CPU or GPU) and a numpy reference.

All vectors are float32 unit rows, so inner product is cosine similarity. Queries go in
batches, so memory is the index plus one batch of results, even for millions of pool vectors.
Ties are broken by pool index (the numpy reference and FAISS agree), so results are
deterministic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnnConfig:
    """``exact_max_pool``: pools up to this size use an exact flat index; larger ones IVF with
    ``nlist`` lists (0: about 4 sqrt(N)) probed ``nprobe`` at a time, trained on a seeded
    sample of ``train_size`` vectors. ``use_gpu``: auto uses faiss's GPUs when it has any."""

    exact_max_pool: int = 2_000_000
    nlist: int = 0
    nprobe: int = 32
    train_size: int = 200_000
    query_batch: int = 4096
    use_gpu: str = "auto"
    seed: int = 0


def topk_numpy(queries: np.ndarray, pool: np.ndarray, k: int, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force reference: ``(scores [Q, k], indices [Q, k])``, best first, ties by index.

    Rows with fewer than ``k`` pool vectors are padded with ``-inf`` / ``-1``.
    """
    q = np.asarray(queries, np.float32)
    p = np.asarray(pool, np.float32)
    kk = min(k, len(p))
    scores = np.full((len(q), k), -np.inf, np.float32)
    idx = np.full((len(q), k), -1, np.int64)
    for s in range(0, len(q), batch):
        sims = q[s : s + batch] @ p.T
        order = np.lexsort((np.broadcast_to(np.arange(len(p)), sims.shape), -sims), axis=1)[:, :kk]
        idx[s : s + batch, :kk] = order
        scores[s : s + batch, :kk] = np.take_along_axis(sims, order, axis=1)
    return scores, idx


def _gpu_count() -> int:
    import faiss

    try:
        return faiss.get_num_gpus()
    except AttributeError:
        return 0


def build_index(pool: np.ndarray, cfg: KnnConfig):
    """A FAISS inner-product index over ``pool`` (float32 unit rows)."""
    import faiss

    x = np.ascontiguousarray(pool, dtype=np.float32)
    n, d = x.shape
    if n <= cfg.exact_max_pool:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = cfg.nlist or int(4 * np.sqrt(n))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(cfg.seed)
        sample = x[np.sort(rng.choice(n, min(n, max(cfg.train_size, 40 * nlist)), replace=False))]
        index.cp.seed = cfg.seed
        index.train(sample)
        index.nprobe = cfg.nprobe
        log.info("knn: IVF index, %d lists, nprobe %d, trained on %d vectors", nlist, cfg.nprobe, len(sample))
    if (cfg.use_gpu == "auto" and _gpu_count() > 0) or cfg.use_gpu == "yes":
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    return index


def search(queries: np.ndarray, pool: np.ndarray, k: int, cfg: KnnConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` pool rows for every query: ``(scores [Q, k], indices [Q, k])``.

    Exact (``IndexFlatIP``) up to ``cfg.exact_max_pool`` pool vectors, IVF above. Missing
    neighbours (``k`` larger than the pool) are ``-inf`` / ``-1``. Ties go to the lower index.
    """
    cfg = cfg or KnnConfig()
    q = np.ascontiguousarray(queries, dtype=np.float32)
    out_s = np.full((len(q), k), -np.inf, np.float32)
    out_i = np.full((len(q), k), -1, np.int64)
    if len(pool) == 0 or len(q) == 0 or k == 0:
        return out_s, out_i
    index = build_index(pool, cfg)
    for s in range(0, len(q), cfg.query_batch):
        scores, idx = index.search(q[s : s + cfg.query_batch], k)
        # FAISS marks missing neighbours with -1; make their scores -inf.
        scores = np.where(idx < 0, -np.inf, scores).astype(np.float32)
        order = np.lexsort((np.where(idx < 0, np.iinfo(np.int64).max, idx), -scores), axis=1)
        out_s[s : s + len(scores)] = np.take_along_axis(scores, order, axis=1)
        out_i[s : s + len(scores)] = np.take_along_axis(idx, order, axis=1)
    return out_s, out_i


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the true top-k neighbours that ``found`` contains (row-wise, averaged)."""
    hits = sum(len(set(f[f >= 0]) & set(t[t >= 0])) for f, t in zip(found, truth))
    total = int((truth >= 0).sum())
    return hits / total if total else 1.0
