"""Benchmark of the precomputed-embedding stages: rows gathered by row against whole files read,
from a local and a loopback S3 (moto) folder, and kNN retrieval queries/s.

Gather: a synthetic clip-retrieval folder (float16, 512-d, url/caption metadata); a share of
its rows (the matches, spread at random, as text matches are) is gathered by
:func:`pipeline.precomputed.gather.gather_file` (vectors by byte range; then also with the
URLs checked against the metadata, as import does), against the baseline of reading each
touched file whole (the ``.npy``; then also the metadata's URL column) and taking the rows. Local files are in the page cache (both sides), so the local ratio is a
floor for a cold disk. S3 is moto on loopback: no network latency, so it too is a floor.

kNN: :func:`pipeline.precomputed.retrieve.retrieve` over the local folder (exact: streamed
BLAS on CPU, IndexFlatIP on GPU; then IVF-PQ with nprobe calibrated), against a numpy BLAS brute force over the folder held in
memory; one query per class (1000 classes, k=100), as ``knn-text`` asks. ``--gpu`` requires
faiss-gpu's GPUs.

Usage: .venv/bin/python bench/precomputed.py [--quick] [--gpu]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np
from _util import add_record_flag, record, table

from pipeline.core import io
from pipeline.demo.embedding_folder import make_folder, unit
from pipeline.precomputed.config import PrecomputedConfig
from pipeline.precomputed.gather import gather_file
from pipeline.precomputed.layout import open_folder, read_metadata
from pipeline.precomputed.reader import read_all
from pipeline.precomputed.search import retrieve
from pipeline.select.knn import recall_at_k

DIM = 512


def gather_rows(folder, picks: dict, urls: dict | None, counters: dict) -> float:
    """Seconds to gather ``picks`` (file position -> rows) by row (``urls``: file position ->
    the matches' URLs, checked against the metadata as import does)."""
    gap = PrecomputedConfig().gap_bytes
    t = time.perf_counter()
    for p, rows in picks.items():
        gather_file(folder.files[p], rows, urls[p] if urls else None, gap, counters)
    return time.perf_counter() - t


def whole_files(folder, picks: dict, urls: bool) -> float:
    """Seconds to read every touched ``.npy`` whole (``urls``: and its metadata's URL column)
    and take the rows."""
    t = time.perf_counter()
    for p, rows in picks.items():
        f = folder.files[p]
        unit(read_all(f.emb, f.header)[rows])
        if urls:
            read_metadata(f, [f.url_col]).column(0).take(rows)
    return time.perf_counter() - t


def bench_gather(root: str, where: str, shares: list[float], rows_out: list) -> None:
    folder = open_folder(root)
    rng = np.random.default_rng(1)
    for share in shares:
        picks = {
            f.index: np.sort(rng.choice(f.rows, max(1, int(f.rows * share)), replace=False))
            for f in folder.files
        }
        n = sum(len(r) for r in picks.values())
        # The matches' URLs, known before the gather (import has them from the matches).
        want = {
            p: read_metadata(folder.files[p], ["url"], r).column(0).to_pylist()
            for p, r in picks.items()
        }
        whole_files(folder, picks, True)  # warm both paths alike (page cache, s3fs clients)
        whole_mb = sum(folder.files[p].header.nbytes for p in picks) / 2**20
        for urls in (False, True):
            base = min(whole_files(folder, picks, urls) for _ in range(3))
            counters: dict = {}
            by_row = min(
                gather_rows(folder, picks, want if urls else None, counters) for _ in range(3)
            )
            rows_out.append(
                {
                    "store": where,
                    "read": "vectors + url check" if urls else "vectors",
                    "share": f"{share:.1%}",
                    "rows": n,
                    "whole files rows/s": n / base,
                    "by row rows/s": n / by_row,
                    "speedup": base / by_row,
                    "npy MB whole": whole_mb,
                    "npy MB by row": counters["bytes"] / 3 / 2**20,  # three runs counted
                }
            )


def bench_knn(root: str, n_q: int, k: int, gpu: bool) -> list[dict]:
    folder = open_folder(root)
    pool = np.concatenate([unit(read_all(f.emb, f.header)) for f in folder.files])
    rng = np.random.default_rng(2)
    q = unit(
        pool[rng.choice(len(pool), n_q, replace=False)] + 0.3 * rng.standard_normal((n_q, DIM))
    )
    t = time.perf_counter()
    truth = np.empty((n_q, k), np.int64)
    for s in range(0, n_q, 256):
        sims = q[s : s + 256] @ pool.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1)
        truth[s : s + 256] = np.take_along_axis(part, order, 1)
    base = time.perf_counter() - t
    rows = [
        {"method": "numpy BLAS brute force, in memory (baseline)", "total_s": base, "recall": 1.0}
    ]
    use_gpu = "yes" if gpu else "no"
    for name, cfg in [
        ("exact from the folder", PrecomputedConfig(k=k, use_gpu=use_gpu)),
        (
            "IVF-PQ from the folder (nprobe calibrated)",
            PrecomputedConfig(k=k, exact_max_rows=0, train_size=10_000, use_gpu=use_gpu),
        ),
    ]:
        t = time.perf_counter()
        _, ids, info, _ = retrieve(folder, q, k, cfg)
        total = time.perf_counter() - t
        label = name + (
            f" nlist={info['nlist']} nprobe={info['nprobe']}" if "nlist" in info else ""
        )
        rows.append({"method": label, "total_s": total, "recall": recall_at_k(ids, truth)})
    for r in rows:
        r["queries/s"] = n_q / r["total_s"]
        r["vs baseline"] = base / r["total_s"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller folder (< 1 min)")
    ap.add_argument("--gpu", action="store_true", help="kNN on faiss-gpu's GPUs (use_gpu=yes)")
    add_record_flag(ap)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    files, per = (4, 20_000) if args.quick else (8, 50_000)
    s3_files = 2 if args.quick else 4
    shares = [0.001, 0.01, 0.1]
    what = f"folder: {files} files x {per:,} rows x {DIM} float16; {os.cpu_count()} cores"
    print(what)
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "laion")
        make_folder(root, sizes=(per,) * files, dim=DIM, dtypes=("float16",), centers=256)
        rows: list = []
        bench_gather(root, "local", shares, rows)
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            import boto3

            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            os.environ.update(
                AWS_ENDPOINT_URL=endpoint,
                AWS_ACCESS_KEY_ID="testing",
                AWS_SECRET_ACCESS_KEY="testing",
                AWS_DEFAULT_REGION="us-east-1",
            )
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            fs, _ = io.url_to_fs("s3://bench")
            for sub in ("img_emb", "metadata"):
                for name in sorted(os.listdir(os.path.join(root, sub)))[:s3_files]:
                    fs.put_file(os.path.join(root, sub, name), f"bench/laion/{sub}/{name}")
            bench_gather("s3://bench/laion", "s3 (moto)", shares, rows)
        finally:
            server.stop()
        print("\nGather by row vs whole files (rows/s; best of 3)")
        cols = ["store", "read", "share", "rows", "whole files rows/s", "by row rows/s"]
        cols = [*cols, "speedup", "npy MB whole", "npy MB by row"]
        print(table(rows, cols))
        record("precomputed_gather", rows, cols, args, note=f"{what}; best of 3")
        n_q = 200 if args.quick else 1000
        what = f"kNN: {n_q} queries, k=100, over {files * per:,} rows (CPU{' + GPU' if args.gpu else ''})"
        print("\n" + what)
        knn = bench_knn(root, n_q, 100, args.gpu)
        cols = ["method", "total_s", "queries/s", "vs baseline", "recall"]
        print(table(knn, cols))
        record("precomputed_knn", knn, cols, args, note=what)


if __name__ == "__main__":
    sys.exit(main())
