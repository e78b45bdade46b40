"""Nearest rows of an embedding folder: exact (numpy's BLAS streamed over the files on CPU, a
FAISS ``IndexFlatIP`` on GPUs) up to ``exact_max_rows`` rows, IVF-PQ above; candidates rescored
exactly from the folder's own vectors, gathered by row, and sorted by (score desc, row asc) as
:mod:`pipeline.select.knn` does; an IVF index's nprobe calibrated by that module's rule against
exact neighbours computed while the index is filled.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import numpy as np

from pipeline.core import io
from pipeline.precomputed.config import PrecomputedConfig
from pipeline.precomputed.gather import unit_rows
from pipeline.precomputed.layout import Folder
from pipeline.precomputed.reader import read_all, read_rows
from pipeline.select.knn import (
    _rescore,
    _set_nprobe,
    _set_threads,
    calibrate_nprobe,
    calibration_sample,
    gpu_count,
)

log = logging.getLogger(__name__)

# Calibration stops where doubling nprobe gains less recall than this.
PLATEAU_GAIN = 0.002

# ---------------------------------------------------------------------- pure cores


def merge_topk(
    best_s: np.ndarray, best_i: np.ndarray, sims: np.ndarray, first: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Running exact top-``k`` (unordered): the best of ``(best_s, best_i)`` and a new block of
    similarities ``sims`` [Q, n] whose rows are global ids ``first..first+n-1``."""
    ids = np.broadcast_to(np.arange(first, first + sims.shape[1]), sims.shape)
    s = np.concatenate([best_s, sims], axis=1)
    i = np.concatenate([best_i, ids], axis=1)
    if s.shape[1] > k:
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        s, i = np.take_along_axis(s, part, 1), np.take_along_axis(i, part, 1)
    return s, i


def block_topk(
    best_s: np.ndarray,
    best_i: np.ndarray,
    q: np.ndarray,
    x: np.ndarray,
    first: int,
    k: int,
    chunk: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`merge_topk` over the rows ``x`` (global ids from ``first``), ``chunk`` rows per
    product, so memory is ``len(q) x chunk`` whatever the file's size."""
    for s in range(0, len(x), chunk):
        sims = q @ x[s : s + chunk].T
        best_s, best_i = merge_topk(best_s, best_i, sims, first + s, k)
    return best_s, best_i


# ---------------------------------------------------------------------- the index


def _pq_m(dim: int, cfg: PrecomputedConfig) -> int:
    m = cfg.pq_m or max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


def _unit_file(folder: Folder, pos: int) -> np.ndarray:
    f = folder.files[pos]
    return unit_rows(read_all(f.emb, f.header))[0]


def gather_ids(folder: Folder, ids: np.ndarray, gap_bytes: int) -> np.ndarray:
    """Unit float32 vectors of global rows ``ids`` (sorted unique), read by row per file."""
    out = np.empty((len(ids), folder.dim), np.float32)
    pos, rows = folder.locate(ids)
    for p in np.unique(pos).tolist():
        sel = np.flatnonzero(pos == p)
        f = folder.files[p]
        out[sel] = unit_rows(read_rows(f.emb, f.header, rows[sel], gap_bytes))[0]
    return out


def build_index(
    folder: Folder, cfg: PrecomputedConfig, info: dict, calib: np.ndarray | None, k: int
):
    """A CPU FAISS index over every row of ``folder`` (ids = global rows), filled file by file.

    Returns ``(index, truth)``: ``truth`` holds the exact top-``k`` ids of the calibration
    queries ``calib`` (computed in the same pass), or None for an exact index or no ``calib``.
    """
    import faiss

    _set_threads(cfg.knn())
    n, d = folder.rows, folder.dim
    truth = None
    if n <= cfg.exact_max_rows:  # on GPUs; on CPU exact search streams the folder instead
        index = faiss.IndexFlatIP(d)
        info.update(index="flat")
        calib = None
    else:
        nlist = min(cfg.nlist, n) if cfg.nlist else max(1, min(int(4 * np.sqrt(n)), n // 40))
        m = _pq_m(d, cfg)
        # "np": no polysemous training (a Hamming pre-filter this search never uses, and
        # most of the training time).
        index = faiss.index_factory(d, f"IVF{nlist},PQ{m}np", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.seed = cfg.seed
        ivf.pq.cp.seed = cfg.seed
        # PQ's 256 centroids per sub-quantizer want some 39 points each, as IVF's lists do.
        n_train = min(n, max(cfg.train_size, 40 * nlist, 256 * 39))
        sample = np.sort(np.random.default_rng(cfg.seed).choice(n, n_train, replace=False))
        t0 = time.perf_counter()
        index.train(gather_ids(folder, sample, cfg.gap_bytes))
        log.info(
            "knn-retrieve: IVF%d,PQ%d trained on %d rows in %.1f s",
            nlist,
            m,
            n_train,
            time.perf_counter() - t0,
        )
        info.update(index="ivfpq", nlist=nlist, pq_m=m, train_size=n_train)
    if calib is not None:
        best_s = np.full((len(calib), 0), -np.inf, np.float32)
        best_i = np.zeros((len(calib), 0), np.int64)
    from tqdm import tqdm

    for f in tqdm(folder.files, desc="index folder", unit="file", disable=None):
        x = _unit_file(folder, f.index)
        index.add(x)
        if calib is not None:
            best_s, best_i = block_topk(best_s, best_i, calib, x, f.first, k)
    if calib is not None:
        truth = best_i
    info["ntotal"] = int(index.ntotal)
    return index, truth


def _gpus(cfg: PrecomputedConfig) -> int:
    """GPUs to search on (0: CPU). Raises RuntimeError for ``use_gpu=yes`` without any."""
    gpus = gpu_count()
    if cfg.use_gpu == "yes" and gpus == 0:
        raise RuntimeError(
            "knn-retrieve: use_gpu=yes but the installed faiss sees no GPU (install faiss-gpu, "
            "the gpu extra, or set precomputed.use_gpu=auto)"
        )
    return gpus if cfg.use_gpu != "no" else 0


def _to_gpu(index, cfg: PrecomputedConfig, info: dict):
    import faiss

    info["gpus"] = _gpus(cfg)
    if not info["gpus"]:
        return index
    co = faiss.GpuMultipleClonerOptions()
    co.useFloat16 = True  # PQ lookup tables in float16: large sub-quantizer counts fit
    return faiss.index_cpu_to_all_gpus(index, co)


def save_index(index, url: str, sidecar: dict) -> None:
    """Write a CPU index to ``url`` (atomically) and its sidecar to ``url + '.json'``."""
    import faiss

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "index")
        faiss.write_index(index, path)
        with open(path, "rb") as fh:
            io.write_bytes(url, fh.read())
    io.write_json(url + ".json", sidecar)


def read_index(url: str):
    """A FAISS index file from any fsspec URL."""
    import faiss

    return faiss.deserialize_index(np.frombuffer(io.read_bytes(url), np.uint8))


# ---------------------------------------------------------------------- search


def search(
    index,
    folder: Folder,
    q: np.ndarray,
    k: int,
    fetch: int,
    cfg: PrecomputedConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` folder rows for each query: ``fetch`` candidates from ``index``, rescored from
    the folder's vectors, sorted by (score desc, row asc). ``(scores, ids)`` [Q, k], padded
    with ``-inf`` / ``-1``."""
    out_s = np.full((len(q), k), -np.inf, np.float32)
    out_i = np.full((len(q), k), -1, np.int64)
    kk = min(k, folder.rows)
    for s in range(0, len(q), cfg.query_batch):
        qb = np.ascontiguousarray(q[s : s + cfg.query_batch], np.float32)
        _, cand = index.search(qb, fetch)
        out_s[s : s + len(qb), :kk], out_i[s : s + len(qb), :kk] = rescore(
            folder, qb, cand.astype(np.int64), kk, cfg.gap_bytes
        )
    return out_s, out_i


def rescore(
    folder: Folder, q: np.ndarray, cand: np.ndarray, k: int, gap_bytes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of the candidate rows ``cand`` [Q, c] (``-1`` = none) from the folder's own
    vectors (gathered by row), sorted by (score desc, row asc), cut to ``k``."""
    uniq = np.unique(cand[cand >= 0])
    vecs = gather_ids(folder, uniq, gap_bytes)
    local = np.where(cand >= 0, np.searchsorted(uniq, np.maximum(cand, 0)), -1)
    scores, idx = _rescore(q, vecs, local, k)
    return scores, np.where(idx >= 0, uniq[np.maximum(idx, 0)], -1)


def stream_topk(folder: Folder, q: np.ndarray, k: int, query_batch: int) -> np.ndarray:
    """Exact top-``k`` row ids (unordered) of every query, by BLAS over the folder read file by
    file: memory is one file and ``query_batch x 65536`` similarities, whatever the folder's size."""
    from tqdm import tqdm

    starts = range(0, len(q), query_batch)
    best = [
        (np.full((len(q[s : s + query_batch]), 0), -np.inf, np.float32),
         np.zeros((len(q[s : s + query_batch]), 0), np.int64))
        for s in starts
    ]  # fmt: skip
    for f in tqdm(folder.files, desc="exact search", unit="file", disable=None):
        x = _unit_file(folder, f.index)
        for j, s in enumerate(starts):
            best[j] = block_topk(*best[j], q[s : s + query_batch], x, f.first, k)
    return np.concatenate([i for _, i in best]) if best else np.zeros((0, k), np.int64)


def exact_search(
    folder: Folder, q: np.ndarray, k: int, cfg: PrecomputedConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` on CPU without an index (:func:`stream_topk`, ``tie_slack`` more, then
    :func:`rescore`): ``(scores, ids)`` [Q, k], padded with ``-inf`` / ``-1``."""
    out_s = np.full((len(q), k), -np.inf, np.float32)
    out_i = np.full((len(q), k), -1, np.int64)
    kk = min(k, folder.rows)
    q = np.ascontiguousarray(q, np.float32)
    cand = stream_topk(folder, q, min(kk + cfg.tie_slack, folder.rows), cfg.query_batch)
    for s in range(0, len(q), cfg.query_batch):
        out_s[s : s + cfg.query_batch, :kk], out_i[s : s + cfg.query_batch, :kk] = rescore(
            folder, q[s : s + cfg.query_batch], cand[s : s + cfg.query_batch], kk, cfg.gap_bytes
        )
    return out_s, out_i


def retrieve(
    folder: Folder, q: np.ndarray, k: int, cfg: PrecomputedConfig, index=None, sidecar=None
) -> tuple[np.ndarray, np.ndarray, dict, object]:
    """Search the folder: ``(scores, ids, info, cpu index or None)``.

    Without ``index``: up to ``exact_max_rows`` rows an exact search (streamed BLAS on CPU, no
    index kept; a flat index on GPUs), else an IVF-PQ index is built. With ``index`` (read
    from a file, ``sidecar`` its json), that index is searched.
    """
    info: dict = {}
    kk = min(k, folder.rows)
    if index is None and folder.rows <= cfg.exact_max_rows and not _gpus(cfg):
        # numpy's BLAS over the files: no copy of the folder in memory, nothing worth saving
        # (the folder is the exact index), and faster than faiss-cpu's bundled BLAS here.
        info.update(index="exact", gpus=0)
        scores, ids = exact_search(folder, q, k, cfg)
        return scores, ids, info, None
    knn_cfg = cfg.knn()
    calib_idx = calibration_sample(len(q), knn_cfg) if len(q) else np.zeros(0, np.int64)
    calib = np.ascontiguousarray(q[calib_idx], np.float32)
    truth = None
    if index is None:
        index, truth = build_index(folder, cfg, info, calib if cfg.nprobe == 0 else None, kk)
    else:
        _set_threads(knn_cfg)
        ivf = _ivf(index)
        info.update(index="ivf" if ivf else "flat" if "Flat" in type(index).__name__ else "other")
        if ivf:
            info["nlist"] = int(ivf.nlist)
        info["loaded"] = True
    cpu = index
    index = _to_gpu(index, cfg, info)
    gpu_cap = 2048 if info.get("gpus") else folder.rows
    slack = kk + cfg.tie_slack if info["index"] == "flat" else kk * cfg.rerank
    fetch = max(1, min(slack, folder.rows, gpu_cap))
    if "nlist" in info:
        nprobe = min(cfg.nprobe, info["nlist"]) if cfg.nprobe else (sidecar or {}).get("nprobe", 0)
        if not nprobe:
            if truth is None:
                log.info("knn-retrieve: calibrating nprobe reads the whole folder once")
                truth = stream_topk(folder, calib, kk, cfg.query_batch)

            def found_at(nprobe: int) -> np.ndarray:
                _set_nprobe(index, nprobe, bool(info.get("gpus")))
                return search(index, folder, calib, kk, fetch, cfg)[1]

            # PQ caps recall below what probing more lists can reach: stop at its plateau.
            nprobe, rec = calibrate_nprobe(
                found_at, truth, info["nlist"], cfg.target_recall, min_gain=PLATEAU_GAIN
            )
            info["calibration_recall"] = round(rec, 4)
            if rec < cfg.target_recall:
                log.warning(
                    "knn-retrieve: recall@%d %.3f at nprobe %d is below the target %.3f and "
                    "probing more lists no longer raises it (PQ's loss: raise rerank or pq_m)",
                    kk, rec, nprobe, cfg.target_recall,
                )  # fmt: skip
        _set_nprobe(index, nprobe, bool(info.get("gpus")))
        info["nprobe"] = int(nprobe)
    info["fetch"] = fetch
    scores, ids = search(index, folder, q, k, fetch, cfg)
    return scores, ids, info, cpu


def _ivf(index):
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
