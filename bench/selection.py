"""Benchmark of stage 4's kNN search: FAISS exact and IVF against a torch matmul + topk baseline.

A pool of 1M and 10k queries of random 512-d float32 unit vectors (100k / 1k with --quick),
k = 10, on CPU with every core. Rows:

- torch matmul+topk (baseline): ``(q @ P^T).topk(k)`` in query batches, what a
  straightforward implementation does;
- faiss exact: :func:`pipeline.select.knn.search` with an ``IndexFlatIP`` (index build, batched search
  and the deterministic rescoring the stage does);
- faiss IVF: the same with ``IndexIVFFlat`` (nlist = sqrt(N) here, so k-means stays short on 2
  cores) and a fixed nprobe (``--nprobe``, default nlist/32; 0 calibrates it to the config's
  target recall as the stage does by default); k-means build and search timed apart, recall@k
  measured against the exact result on every query.

Uniform random vectors have no cluster structure, the worst case for IVF (real CLIP features
are strongly clustered); ``--clustered`` draws a normalised mixture of Gaussians instead.

Usage: .venv/bin/python bench/selection.py [--quick] [--clustered]
"""

from __future__ import annotations

import os
import sys

# This file's name shadows the standard library's ``select`` (imported by subprocess, torch):
# move bench/ to the end of the path so the stdlib wins and ``_util`` is still found.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from _util import add_record_flag, record, table  # noqa: E402

import pipeline.select.knn as knn  # noqa: E402
from pipeline.select.knn import KnnConfig, recall_at_k, search  # noqa: E402

K, DIM = 10, 512


def unit_rows(
    rng: np.random.Generator, n: int, centers: np.ndarray | None, chunk: int = 100_000
) -> np.ndarray:
    """``n`` float32 unit rows, built in chunks so peak memory stays near the output's."""
    out = np.empty((n, DIM), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = rng.standard_normal((m, DIM), dtype=np.float32)
        if centers is not None:
            x = centers[rng.integers(0, len(centers), m)] + x / np.sqrt(DIM)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def torch_topk(q: np.ndarray, pool: np.ndarray, k: int, batch: int = 256) -> np.ndarray:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    p = torch.from_numpy(pool)
    out = np.empty((len(q), k), np.int64)
    with torch.inference_mode():
        for s in range(0, len(q), batch):
            out[s : s + batch] = (
                (torch.from_numpy(q[s : s + batch]) @ p.T).topk(k, dim=1).indices.numpy()
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100k pool, 1k queries (< 60 s)")
    ap.add_argument(
        "--clustered", action="store_true", help="mixture of Gaussians instead of uniform vectors"
    )
    ap.add_argument(
        "--nprobe",
        type=int,
        help="IVF lists probed (default nlist/32; 0: calibrate to the target recall)",
    )
    add_record_flag(ap)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n_pool, n_q = (100_000, 1_000) if args.quick else (1_000_000, 10_000)
    rng = np.random.default_rng(0)
    centers = None
    if args.clustered:
        c = rng.standard_normal((1000, DIM), dtype=np.float32)
        centers = c / np.linalg.norm(c, axis=1, keepdims=True)
    t = time.perf_counter()
    pool = unit_rows(rng, n_pool, centers)
    q = unit_rows(rng, n_q, centers)
    what = f"pool {n_pool:,} x {DIM}, queries {n_q:,}, k={K}, {os.cpu_count()} cores, data {'clustered' if args.clustered else 'uniform'}"
    print(f"{what} ({time.perf_counter() - t:.1f} s to make)")

    rows = []
    t = time.perf_counter()
    base_idx = torch_topk(q, pool, K)
    base_s = time.perf_counter() - t
    rows.append(
        {
            "method": "torch matmul+topk (baseline)",
            "build_s": "-",
            "search_s": base_s,
            "total_s": base_s,
        }
    )

    info: dict = {}
    t = time.perf_counter()
    _, exact_idx = search(q, pool, K, KnnConfig(exact_max_pool=n_pool), info)
    exact_s = time.perf_counter() - t
    rows.append(
        {"method": "faiss exact (IndexFlatIP)", "build_s": "-", "search_s": "-", "total_s": exact_s}
    )

    nlist = int(np.sqrt(n_pool))
    nprobe = max(1, nlist // 32) if args.nprobe is None else args.nprobe
    cfg = KnnConfig(exact_max_pool=0, nlist=nlist, nprobe=nprobe, train_size=40 * nlist)
    info = {}
    t = time.perf_counter()
    # Time k-means apart from search: build once here, then search through the stage's code.
    knn.build_index(pool, cfg, {})
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    _, ivf_idx = search(q, pool, K, cfg, info)
    total_ivf = time.perf_counter() - t
    rows.append(
        {
            "method": f"faiss IVF nlist={nlist} nprobe={info['nprobe']}",
            "build_s": build_s,
            "search_s": total_ivf - build_s,
            "total_s": total_ivf,
        }
    )

    recall = {
        "torch matmul+topk (baseline)": recall_at_k(base_idx, exact_idx),
        "faiss exact (IndexFlatIP)": 1.0,
    }
    recall[rows[2]["method"]] = recall_at_k(ivf_idx, exact_idx)
    for r in rows:
        r["recall@10"] = recall[r["method"]]
        r["queries/s"] = n_q / r["total_s"]
        r["speed vs torch"] = base_s / r["total_s"]
    cols = ["method", "build_s", "search_s", "total_s", "queries/s", "speed vs torch", "recall@10"]
    print(table(rows, cols))
    if "calibration_recall" in info:
        calibration = f"IVF calibration: recall@{K} {info['calibration_recall']} on {cfg.calibration_queries} sampled queries (target {cfg.target_recall})"
        print(calibration)
        what += "; " + calibration
    record("selection", rows, cols, args, note=what)


if __name__ == "__main__":
    main()
