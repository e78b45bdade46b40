"""Top-k inner-product search with FAISS (exact or IVF, CPU or GPU) and a numpy reference.

All vectors are float32 unit rows, so inner product is cosine similarity. Queries go in
batches, so memory is the index plus one batch of results, even for millions of pool vectors.

Determinism: FAISS is asked for a few more neighbours than needed (``tie_slack``); the returned
pairs are rescored with one fixed float32 dot product and sorted by (score desc, pool index
asc). Scores and tie order therefore do not depend on BLAS blocking, query batch composition or
CPU vs GPU, and agree with :func:`topk_numpy`.

IVF: ``nlist`` lists (0: about 4 sqrt(N)), k-means trained on a seeded sample. ``nprobe`` 0
calibrates it: on a seeded sample of the real queries, nprobe doubles from 1 until recall@k
against exact search (BLAS over the pool) reaches ``target_recall``. That recall is the
config's claim, recorded in ``info`` and checked against brute force in tests/select/test_knn.py.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnnConfig:
    """FAISS settings (mirrored by section ``select`` of conf/stages/select.yaml).

    - ``exact_max_pool``: pools up to this many vectors use an exact ``IndexFlatIP``; larger
      ones an ``IndexIVFFlat``.
    - ``nlist``: IVF lists (0: ``4 sqrt(N)``, at most ``N / 40``); ``train_size``: k-means sample (raised to 40 per
      list when possible, as FAISS recommends).
    - ``nprobe``: lists probed per query; 0 calibrates it to ``target_recall`` (recall@k vs exact
      search on ``calibration_queries`` sampled queries).
    - ``query_batch``: queries per FAISS call (memory is ``query_batch * (k + tie_slack)``).
    - ``use_gpu``: ``auto`` uses faiss's GPUs when the installed faiss has any, ``yes`` requires
      them, ``no`` stays on CPU. ``threads``: OpenMP threads for CPU search (0: all cores).
    """

    exact_max_pool: int = 2_000_000
    nlist: int = 0
    nprobe: int = 0
    target_recall: float = 0.95
    calibration_queries: int = 256
    train_size: int = 200_000
    query_batch: int = 4096
    tie_slack: int = 8
    use_gpu: str = "auto"
    threads: int = 0
    seed: int = 0

    @classmethod
    def of(cls, cfg, **renamed) -> KnnConfig:
        """The FAISS settings of a stage's config: its fields of the same names, then
        ``renamed`` (the values of fields it names otherwise)."""
        same = {f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)}
        return cls(**{**same, **renamed})

    def __post_init__(self) -> None:
        problems = []
        if self.exact_max_pool < 0 or self.nlist < 0 or self.nprobe < 0 or self.threads < 0:
            problems.append("exact_max_pool, nlist, nprobe and threads must be >= 0")
        if not 0.0 < self.target_recall <= 1.0:
            problems.append("target_recall must be in (0, 1]")
        if self.query_batch < 1 or self.calibration_queries < 1 or self.train_size < 1:
            problems.append("query_batch, calibration_queries and train_size must be >= 1")
        if self.tie_slack < 0:
            problems.append("tie_slack must be >= 0")
        if self.use_gpu not in ("auto", "yes", "no"):
            problems.append("use_gpu must be auto, yes or no")
        if problems:
            raise ValueError("; ".join(problems))


# ---------------------------------------------------------------------- numpy reference


def topk_numpy(
    queries: np.ndarray, pool: np.ndarray, k: int, batch: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force reference: ``(scores [Q, k] float32, indices [Q, k] int64)``, best first,
    ties by lower pool index.

    Rows with fewer than ``k`` pool vectors are padded with ``-inf`` / ``-1``.
    """
    q = np.asarray(queries, np.float32)
    p = np.asarray(pool, np.float32)
    kk = min(k, len(p))
    scores = np.full((len(q), k), -np.inf, np.float32)
    idx = np.full((len(q), k), -1, np.int64)
    if kk == 0:
        return scores, idx
    p64 = p.astype(np.float64)
    for s in range(0, len(q), batch):
        # float64, then rounded: a float32 BLAS product can score identical pool rows
        # differently (a kernel's tail columns accumulate in another order; seen on AMD EPYC),
        # which would break the reference's own tie rule.
        sims = (q[s : s + batch].astype(np.float64) @ p64.T).astype(np.float32)
        order = np.lexsort((np.broadcast_to(np.arange(len(p)), sims.shape), -sims), axis=1)[:, :kk]
        idx[s : s + batch, :kk] = order
        scores[s : s + batch, :kk] = np.take_along_axis(sims, order, axis=1)
    return scores, idx


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the true top-k neighbours (``-1`` = none) that ``found`` contains, over all
    queries."""
    hits = sum(len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth))
    total = int((truth >= 0).sum())
    return hits / total if total else 1.0


# ---------------------------------------------------------------------- FAISS


def gpu_count() -> int:
    """GPUs the installed faiss can use (0 for faiss-cpu)."""
    import faiss

    try:
        return int(faiss.get_num_gpus())
    except AttributeError:
        return 0


def _set_threads(cfg: KnnConfig) -> None:
    import faiss

    faiss.omp_set_num_threads(cfg.threads or os.cpu_count() or 1)


def _set_nprobe(index, nprobe: int, on_gpu: bool) -> None:
    import faiss

    # GpuParameterSpace also reaches through the replica/shard wrappers of several GPUs.
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", int(nprobe))


def build_index(pool: np.ndarray, cfg: KnnConfig, info: dict | None = None):
    """A FAISS inner-product index holding ``pool`` (float32 unit rows).

    Exact up to ``cfg.exact_max_pool`` rows, IVF above (``nprobe`` still unset when
    ``cfg.nprobe`` is 0; :func:`search` calibrates it). ``info`` (when given) receives the
    index kind and its parameters. Raises ``RuntimeError`` for ``use_gpu='yes'`` without GPUs.
    """
    import faiss

    _set_threads(cfg)
    x = np.ascontiguousarray(pool, dtype=np.float32)
    n, d = x.shape
    info = info if info is not None else {}
    if n <= cfg.exact_max_pool:
        index = faiss.IndexFlatIP(d)
        info.update(index="flat")
    else:
        # Auto: 4 sqrt(N) lists, but no more than N/40 so each list gets FAISS's minimum of
        # 39 training points.
        nlist = min(cfg.nlist, n) if cfg.nlist else max(1, min(int(4 * np.sqrt(n)), n // 40))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(cfg.seed)
        n_train = min(n, max(cfg.train_size, 40 * nlist))
        sample = x[np.sort(rng.choice(n, n_train, replace=False))]
        index.cp.seed = cfg.seed
        t0 = time.perf_counter()
        index.train(sample)
        log.info(
            "knn: IVF %d lists trained on %d vectors in %.1f s",
            nlist,
            n_train,
            time.perf_counter() - t0,
        )
        info.update(index="ivf", nlist=nlist, train_size=n_train)
    gpus = gpu_count()
    if cfg.use_gpu == "yes" and gpus == 0:
        raise RuntimeError(
            "knn: use_gpu=yes but the installed faiss sees no GPU (install faiss-gpu, or set select.use_gpu=auto)"
        )
    if cfg.use_gpu != "no" and gpus > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    info["gpus"] = gpus if cfg.use_gpu != "no" else 0
    index.add(x)
    return index


def _exact_topk_ids(q: np.ndarray, pool: np.ndarray, k: int, chunk: int = 65536) -> np.ndarray:
    """Exact top-``k`` pool rows (unordered) of a few queries by BLAS over pool chunks: much
    faster than an IVF scan of every list, and no second copy of the pool."""
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for s in range(0, len(pool), chunk):
        sims = q @ pool[s : s + chunk].T
        cand_s = np.concatenate([best_s, sims], axis=1)
        cand_i = np.concatenate(
            [best_i, np.broadcast_to(np.arange(s, s + sims.shape[1]), sims.shape)], axis=1
        )
        if cand_s.shape[1] > k:
            part = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
            cand_s, cand_i = (
                np.take_along_axis(cand_s, part, 1),
                np.take_along_axis(cand_i, part, 1),
            )
        best_s, best_i = cand_s, cand_i
    return best_i


def _calibrate_nprobe(
    index, q: np.ndarray, pool: np.ndarray, k: int, nlist: int, cfg: KnnConfig, on_gpu: bool
) -> tuple[int, float]:
    """Smallest power-of-two nprobe (or ``nlist``) whose recall@k against exact search, on a
    seeded sample of the queries, reaches ``cfg.target_recall``; returns ``(nprobe, recall)``."""
    sample = np.ascontiguousarray(q[calibration_sample(len(q), cfg)])
    truth = _exact_topk_ids(sample, pool, k)

    def found_at(nprobe: int) -> np.ndarray:
        _set_nprobe(index, nprobe, on_gpu)
        return index.search(sample, k)[1]

    return calibrate_nprobe(found_at, truth, nlist, cfg.target_recall)


def calibration_sample(n_queries: int, cfg: KnnConfig) -> np.ndarray:
    """Sorted indices of the (seeded) queries nprobe is calibrated on."""
    rng = np.random.default_rng(cfg.seed)
    m = min(n_queries, cfg.calibration_queries)
    return np.sort(rng.choice(n_queries, m, replace=False))


def calibrate_nprobe(
    found_at: Callable[[int], np.ndarray],
    truth: np.ndarray,
    nlist: int,
    target_recall: float,
    min_gain: float = 0.0,
) -> tuple[int, float]:
    """The calibration rule: nprobe doubles from 1 (capped at ``nlist``) until the neighbours
    ``found_at(nprobe)`` returns for the sample reach ``target_recall`` against ``truth``
    (exact neighbour ids, ``-1`` = none); returns ``(nprobe, recall)``.

    ``min_gain`` > 0 also stops where a doubling gains less recall than that (a compressed
    index's ceiling below the target: probing every list would only cost time)."""
    nprobe, prev = 1, -1.0
    while True:
        rec = recall_at_k(found_at(nprobe), truth)
        log.debug("knn: nprobe %d recall %.4f", nprobe, rec)
        if rec >= target_recall or nprobe >= nlist or (prev >= 0 and rec - prev < min_gain):
            return nprobe, rec
        nprobe, prev = min(nprobe * 2, nlist), rec


def _rescore(
    q: np.ndarray, pool: np.ndarray, idx: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact float32 scores of the candidate pairs ``idx`` (``-1`` = none), sorted by
    (score desc, index asc) and cut to ``k``."""
    safe = np.where(idx < 0, 0, idx)
    scores = np.empty(idx.shape, np.float32)
    # Gathered candidate rows are [queries, k, D]: 1024 queries at a time bounds that memory.
    for s in range(0, len(q), 1024):
        cand = pool[safe[s : s + 1024]]
        scores[s : s + 1024] = np.einsum("qd,qkd->qk", q[s : s + 1024], cand, optimize=False)
    scores[idx < 0] = -np.inf
    tie_key = np.where(idx < 0, np.iinfo(np.int64).max, idx)
    order = np.lexsort((tie_key, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(idx, order, axis=1)


def search(
    queries: np.ndarray,
    pool: np.ndarray,
    k: int,
    cfg: KnnConfig | None = None,
    info: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` pool rows for every query: ``(scores [Q, k] float32, indices [Q, k] int64)``.

    Exact (``IndexFlatIP``) up to ``cfg.exact_max_pool`` pool vectors, IVF above. Missing
    neighbours (``k`` larger than the pool) are ``-inf`` / ``-1``. Ties go to the lower index.
    ``info`` (when given) receives the index kind, IVF ``nlist``/``nprobe`` and, when nprobe
    was calibrated, the measured ``calibration_recall``.
    """
    from pipeline.core.progress import progress

    cfg = cfg or KnnConfig()
    info = info if info is not None else {}
    q = np.ascontiguousarray(queries, dtype=np.float32)
    p = np.ascontiguousarray(pool, dtype=np.float32)
    out_s = np.full((len(q), k), -np.inf, np.float32)
    out_i = np.full((len(q), k), -1, np.int64)
    if len(p) == 0 or len(q) == 0 or k == 0:
        info.setdefault("index", "none")
        return out_s, out_i
    if q.shape[1] != p.shape[1]:
        raise ValueError(f"knn: queries have dimension {q.shape[1]} but the pool {p.shape[1]}")
    index = build_index(p, cfg, info)
    kk = min(k, len(p))
    # GPU indexes answer at most 2048 neighbours; the slack only helps ties, so cap it there.
    fetch = min(kk + cfg.tie_slack, len(p), 2048 if info.get("gpus") else len(p))
    if info["index"] == "ivf":
        if cfg.nprobe:
            nprobe = min(cfg.nprobe, info["nlist"])
        else:
            nprobe, rec = _calibrate_nprobe(
                index, q, p, kk, info["nlist"], cfg, bool(info.get("gpus"))
            )
            info["calibration_recall"] = round(rec, 4)
        _set_nprobe(index, nprobe, bool(info.get("gpus")))
        info["nprobe"] = nprobe
        log.info(
            "knn: IVF nlist %d nprobe %d%s",
            info["nlist"],
            nprobe,
            f" (calibrated recall@{kk} {info['calibration_recall']:.3f})"
            if "calibration_recall" in info
            else "",
        )
    batches = range(0, len(q), cfg.query_batch)
    for s in progress(batches, desc="knn", unit="batch", disable=len(batches) <= 1):
        qb = q[s : s + cfg.query_batch]
        _, idx = index.search(qb, fetch)
        scores, idx = _rescore(qb, p, idx.astype(np.int64), kk)
        out_s[s : s + len(qb), :kk] = scores
        out_i[s : s + len(qb), :kk] = idx
    return out_s, out_i


def search_grouped(
    queries: np.ndarray,
    q_groups: np.ndarray,
    pool: np.ndarray,
    p_groups: np.ndarray,
    k: int,
    cfg: KnnConfig | None = None,
    info: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`search`, but query ``i`` only sees pool rows with ``p_groups == q_groups[i]``
    (one sub-search per group). Returned indices are rows of the whole ``pool``; a query
    whose group has fewer than ``k`` pool rows gets ``-inf`` / ``-1`` padding.

    ``info`` receives ``groups`` (searched), ``empty_groups`` (query groups with no pool row)
    and the index kind of the largest group.
    """
    q_groups = np.asarray(q_groups)
    p_groups = np.asarray(p_groups)
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_i = np.full((len(queries), k), -1, np.int64)
    info = info if info is not None else {}
    empty, searched, largest = [], 0, -1
    for g in np.unique(q_groups):
        members = np.flatnonzero(p_groups == g)
        rows = np.flatnonzero(q_groups == g)
        if len(members) == 0:
            empty.append(g.item() if hasattr(g, "item") else g)
            continue
        sub: dict = {}
        s, i = search(queries[rows], pool[members], k, cfg, sub)
        out_s[rows] = s
        out_i[rows] = np.where(i >= 0, members[np.maximum(i, 0)], -1)
        searched += 1
        if len(members) > largest:
            largest = len(members)
            info.update(sub)
    info.update(groups=searched, empty_groups=empty)
    return out_s, out_i
