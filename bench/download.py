"""Benchmark of stage 2: `primer download` vs a bare `img2dataset.download` on the same URLs.

    .venv/bin/python bench/download.py [--quick] [--images N] [--processes P] [--threads T]

Serves Fashion-MNIST images from the loopback image server (in this process) and downloads
the same URL list twice, each in a fresh Python process so neither inherits the other's
imports or worker pools: once through Primer's stage (URL check, staging, img2dataset with
Primer's limits, manifest, stats) and once with img2dataset alone (same processes, threads,
shard size and resize settings). Each child times only its download call (imports excluded,
worker start-up included). Also times the URL pre-check, vectorised vs per URL.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _util import add_record_flag, record, table  # also puts the repo root on sys.path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def _child(kind: str, matches: str, out: str, processes: int, threads: int, shard: int) -> None:
    """Run one download in this (fresh) process; print its seconds and image count as JSON."""
    from pipeline.core import io

    if kind == "primer":
        from pipeline.download.stage import DownloadConfig, run_download

        cfg = DownloadConfig(
            processes=processes,
            threads=threads,
            samples_per_shard=shard,
            image_size=64,
            timeout=10,
            retries=0,
            allow_private_addresses=True,
        )
        t0 = time.perf_counter()
        stats = run_download(cfg, matches, out)
        seconds, images = time.perf_counter() - t0, stats["success"]
    else:
        import img2dataset

        url_list = io.list_files(matches, suffixes=(".parquet",))[0]
        t0 = time.perf_counter()
        img2dataset.download(
            url_list=url_list, output_folder=out, input_format="parquet", url_col="url", caption_col="caption",
            save_additional_columns=["uid", "label", "class_name"], output_format="webdataset",
            processes_count=processes, thread_count=threads, number_sample_per_shard=shard,
            image_size=64, resize_mode="keep_ratio", timeout=10, retries=0, enable_wandb=False,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        images = sum(
            json.load(open(os.path.join(out, f)))["successes"]
            for f in os.listdir(out)
            if f.endswith("_stats.json")
        )
    sys.stdout.write(json.dumps({"seconds": seconds, "images": images}) + "\n")


def _run_child(kind: str, matches: str, out: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--matches", matches, "--out", out,
           "--processes", str(args.processes), "--threads", str(args.threads), "--shard", str(args.shard)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if res.returncode:
        raise RuntimeError(f"{kind} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _urlcheck_rows(n: int) -> list[dict]:
    import pyarrow as pa

    from pipeline.download.urlcheck import check_url, check_urls

    urls = pa.array([f"https://img{i % 997}.example.com/p/{i}.jpg?w=640" for i in range(n)])
    py = urls.to_pylist()
    t0 = time.perf_counter()
    [check_url(u) for u in py]
    ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    check_urls(urls)
    vec = time.perf_counter() - t0
    return [
        {
            "what": "url check, per URL (check_url)",
            "items": n,
            "seconds": ref,
            "per_s": n / ref,
            "ratio": 1.0,
        },
        {
            "what": "url check, vectorised (check_urls)",
            "items": n,
            "seconds": vec,
            "per_s": n / vec,
            "ratio": ref / vec,
        },
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller run (under a minute)")
    p.add_argument("--images", type=int, help="number of images (default 3000, quick 600)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--shard", type=int, help="samples per shard (default images/8)")
    p.add_argument("--child", choices=["primer", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--matches", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    add_record_flag(p)
    args = p.parse_args()
    if args.child:
        _child(args.child, args.matches, args.out, args.processes, args.threads, args.shard)
        return

    import pyarrow as pa

    from pipeline.core import io
    from pipeline.demo.imageserver import ImageServer

    n = args.images or (600 if args.quick else 3000)
    args.shard = args.shard or max(50, n // 8)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ImageServer() as server:
        urls = [server.url(f"fmnist/train/{i}.jpg") for i in range(n)]
        caps = [f"a photo of item {i}" for i in range(n)]
        t = pa.table(
            {
                "uid": io.make_uids(urls, caps),
                "url": urls,
                "caption": caps,
                "label": pa.array([i % 10 for i in range(n)], pa.int32()),
                "class_name": [f"class{i % 10}" for i in range(n)],
            }
        )
        matches = os.path.join(tmp, "matches")
        io.write_parquet(t, os.path.join(matches, "part-00000.parquet"))
        io.mark_done(matches)
        # Warm the server's image cache so neither side pays the JPEG encoding.
        for i in range(n):
            server.resolve(f"fmnist/train/{i}.jpg")
        timings = {}
        for kind in ("bare", "primer"):
            r = _run_child(kind, matches, os.path.join(tmp, kind), args)
            timings[kind] = r
            if r["images"] != n:
                raise RuntimeError(f"{kind}: {r['images']} of {n} images downloaded")
        base = timings["bare"]["images"] / timings["bare"]["seconds"]
        for kind, label in (
            ("bare", "img2dataset.download (bare)"),
            ("primer", "primer download (run_download)"),
        ):
            r = timings[kind]
            rate = r["images"] / r["seconds"]
            rows.append(
                {
                    "what": label,
                    "items": r["images"],
                    "seconds": r["seconds"],
                    "per_s": rate,
                    "ratio": rate / base,
                }
            )
    rows += _urlcheck_rows(200_000 if args.quick else 1_000_000)
    what = f"download: {n} Fashion-MNIST images from loopback, {args.processes} processes x {args.threads} threads, {args.shard} per shard"
    sys.stdout.write(what + "\n")
    cols = ["what", "items", "seconds", "per_s", "ratio"]
    sys.stdout.write(table(rows, cols) + "\n")
    record("download", rows, cols, args, note=what)
    sys.stdout.write("ratio: throughput relative to the first row of its kind (>1 is faster)\n")


if __name__ == "__main__":
    main()
