"""The text filter's global filters (driver): one pass over all match keys against URL buckets.

    python bench/global_filters.py                 # 1.45M matches in 8 parts (~1 min)
    python bench/global_filters.py --rows 10000000 --url-share 1.2

Keys from pipeline.demo.synthetic.scan_keys (random uids; URLs shared by about ``--url-share`` uids
each; a tenth of the rows repeated in later parts, some under another class), written as a
scan writes them. For URL de-duplication alone, without it, and with a per-class cap: the
peak memory the pass allocates (tracemalloc; numpy reports its buffers to it) per match, and
its time (median of three, untraced), with ``global_memory_mb`` 0 (one pass) and budgets
that give 8 and 32 buckets. Every bucketed run is checked to keep the same rows as one pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import tempfile
import time
import tracemalloc

from _util import add_record_flag, record, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_450_000, help="matches")
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--url-share", type=float, default=2.0, help="uids per URL, about")
    add_record_flag(ap)
    ap.add_argument(
        "--quick", action="store_true", help="a small run (seconds to a minute) for make bench"
    )
    args = ap.parse_args()
    if args.quick:
        args.rows = min(args.rows, 100_000)
    logging.basicConfig(level=logging.WARNING)
    from pipeline.demo.synthetic import scan_keys, write_scan_keys
    from pipeline.text_filter.config import TextFilterConfig
    from pipeline.text_filter.global_filters import GLOBAL_BYTES_PER_MATCH, global_pass

    tmp = tempfile.mkdtemp(prefix="primer-bench-global-")
    try:
        done, matched = write_scan_keys(
            tmp, scan_keys(args.rows, args.parts, seed=0, url_share=args.url_share)
        )
        n = sum(matched)
        rows = []
        for name, cfg in {
            "dedup": TextFilterConfig(),
            "no dedup": TextFilterConfig(dedup_urls=False),
            "dedup + cap 1000": TextFilterConfig(max_per_class=1000),
        }.items():
            base = None
            for buckets in (1, 8, 32):
                # A budget that asks for exactly this many buckets.
                mb = 0 if buckets == 1 else n * GLOBAL_BYTES_PER_MATCH // buckets // 2**20 + 1
                c = dataclasses.replace(cfg, global_memory_mb=mb)
                tracemalloc.start()
                kept, _, _, got = global_pass(tmp, done, matched, c, 50)
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    global_pass(tmp, done, matched, c, 50)
                    times.append(time.perf_counter() - t0)
                seconds = sorted(times)[1]
                if base is None:
                    base = (kept, peak, seconds)
                elif not (kept == base[0]).all():
                    raise SystemExit(f"{name}, {got} buckets: other rows kept than one pass")
                rows.append(
                    {
                        "filters": name,
                        "buckets": got,
                        "peak MB": peak / 1e6,
                        "bytes/match": peak / n,
                        "seconds": seconds,
                        "memory vs one pass": peak / base[1],
                        "time vs one pass": seconds / base[2],
                        "kept": f"{int(kept.sum()):,}",
                    }
                )
        what = f"{n:,} matches in {args.parts} parts, about {args.url_share:g} uids per URL"
        print(what)
        print(table(rows, list(rows[0])))
        record("global_filters", rows, list(rows[0]), args, note=what)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
