"""Text-filter throughput: the matcher and `primer filter` against baselines, in one run.

    python bench/text_filter.py            # 2M captions, 1000 ImageNet class names (~3 min)
    python bench/text_filter.py --quick    # 200k captions (< 1 min)
    python bench/text_filter.py --files 16 --task-rows 0   # the same rows in 16 files, a task each
    python bench/text_filter.py --files 1 --split-rows 1000000   # one file, scanned in 2 pieces
    python bench/text_filter.py --matcher-only   # the matcher rows alone (no Spark)
    python bench/text_filter.py --matcher-only --dataset StanfordCars   # another dataset's rules

Rows: a bare pyarrow read of the caption column (the floor); the matcher alone on one core,
with each installed engine (its one-off start, numba's kernel load or compile included, is
noted apart); two processes at once each reading half the files' needed columns and matching
their captions, nothing else (no Spark, no filters, uids or writes: the ceiling of local[2]
on this machine); `primer filter` end to end on local[2] (session already started, time from the
call to _SUCCESS) and Spark's `rlike` with one big case-insensitive alternation on a slice,
run in turns five times (medians; this shared 2-core machine's speed drifts over minutes,
so the end-to-end/rlike ratio is taken run by run); a naive per-class Python regex loop on a
slice. Ratios in the table are against the matcher (default engine).
Captions: pipeline.demo.synthetic (LAION-like, mean ~67 characters, 5% planted class names).
The matcher is the dataset's, as `primer filter` builds it: names, synonyms and the match rules
(exclusions; families, kind words and years where the dataset has them).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
from _util import add_record_flag, record, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", type=int)
    ap.add_argument("--files", type=int, default=4, help="input files the rows are split into")
    ap.add_argument(
        "--task-rows", type=int, help="filter.task_rows for the end-to-end job (0: a task per file)"
    )
    ap.add_argument(
        "--split-rows", type=int, help="filter.split_rows for the end-to-end job (0: never split)"
    )
    ap.add_argument("--dataset", default="ImageNet", help="whose classes and rules to match")
    ap.add_argument("--matcher-only", action="store_true", help="the matcher rows alone")
    add_record_flag(ap)
    args = ap.parse_args()
    n = args.rows or (200_000 if args.quick else 2_000_000)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    tmp = tempfile.mkdtemp(prefix="primer-bench-filter-")
    try:
        run(
            n, args.quick, args.dataset, tmp, args.files, args.task_rows, args.split_rows,
            args.matcher_only, args,
        )  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(
    n: int,
    quick: bool,
    dataset: str,
    tmp: str,
    files: int,
    task_rows: int | None,
    split_rows: int | None,
    matcher_only: bool = False,
    args=None,
) -> None:
    from pipeline.core.config import load_dataset
    from pipeline.demo.synthetic import laion_table, make_captions
    from pipeline.text_filter.matcher import ENGINES, Matcher
    from pipeline.text_filter.terms import MatchRules

    rules = MatchRules.from_spec(load_dataset(dataset, descriptions=False))
    classes = list(rules.classes)

    meta = os.path.join(tmp, "meta")
    os.makedirs(meta)
    t0 = time.perf_counter()
    caps, _ = make_captions(n, classes, match_rate=0.05, seed=0, mean_words=11.0)
    step = -(-n // files)
    for i in range(files):
        part = caps[i * step : (i + 1) * step]
        pq.write_table(
            laion_table(len(part), schema="laion2b", seed=i, captions=part),
            os.path.join(meta, f"part-{i}.parquet"),
        )
    mb = sum(len(c.encode()) for c in caps) / 1e6
    print(
        f"{n:,} captions, mean {sum(map(len, caps)) / n:.1f} chars, {mb:.0f} MB of caption text, {len(classes)} classes of {dataset} (generated in {time.perf_counter() - t0:.0f} s)"
    )
    rows = []

    def add(name, count, seconds, note=""):
        rows.append(
            {
                "method": name,
                "captions": count,
                "seconds": seconds,
                "captions/s": count / seconds,
                "MB/s": mb * count / n / seconds,
                "note": note,
            }
        )

    t0 = time.perf_counter()
    total = sum(
        pq.read_table(os.path.join(meta, f"part-{i}.parquet"), columns=["TEXT"]).num_rows
        for i in range(files)
    )
    add("pyarrow read (floor)", total, time.perf_counter() - t0)

    arr = pa.array(caps)
    default_engine = Matcher(classes[:1]).engine
    installed = []
    for engine in ENGINES:
        try:
            Matcher(classes[:1], engine=engine)
            installed.append(engine)
        except ImportError:
            print(f"engine {engine} not installed: skipped")
    for engine in dict.fromkeys([default_engine, *installed]):
        t0 = time.perf_counter()
        matcher = Matcher.from_rules(rules, engine=engine)
        matcher.match(arr.slice(0, 1000))  # first call: numba loads (or compiles) its kernel
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        matched = ambiguous = ruled_out = 0
        for s in range(0, n, 65536):
            label = matcher.match(arr.slice(s, 65536)).label
            matched += int((label >= 0).sum())
            ambiguous += int((label == -2).sum())
            ruled_out += int((label <= -3).sum())
        note = (
            f"{matched:,} matched, {ambiguous:,} ambiguous, {ruled_out:,} excluded or "
            f"contradicted; ready in {build_s * 1000:.0f} ms"
        )
        add(f"matcher, 1 core ({engine})", n, time.perf_counter() - t0, note)
    cols = ["method", "captions", "seconds", "captions/s", "MB/s", "vs matcher", "note"]
    if matcher_only:
        _vs_matcher(rows)
        print(table(rows, cols))
        record("text_filter", rows, cols, args, note=f"{dataset}, {n:,} captions")
        return

    seconds, spread = _two_process_floor(meta, files, rules, 1 if quick else 3)
    add(
        "read + matcher, 2 processes",
        n,
        seconds,
        f"no Spark, nothing written: local[2]'s ceiling on this machine{spread}",
    )

    from pipeline.core.spark import get_spark
    from pipeline.text_filter.config import TextFilterConfig
    from pipeline.text_filter.stage import run_text_filter

    settings = {"task_rows": task_rows, "split_rows": split_rows}
    cfg = TextFilterConfig(**{k: v for k, v in settings.items() if v is not None})

    spark = get_spark("local[2]", app_name="bench")
    # Warm-up, as a long job is warm: Spark's Python workers started with their imports (one
    # file per local core, so that both start), and the JVM's JIT compilers done with the
    # scheduler's hot paths. A cold JVM spends up to a core-second of C2 compiling per job
    # here, on the same two cores as the tasks; five small jobs take most of that away. The
    # rlike baseline gets its own warm-up below.
    warm = os.path.join(tmp, "warm")
    os.makedirs(warm)
    for i in range(2):
        pq.write_table(
            laion_table(20_000, schema="laion2b", seed=100 + i, captions=caps[:20_000]),
            os.path.join(warm, f"w{i}.parquet"),
        )
    for k in range(5):
        run_text_filter(TextFilterConfig(), dataset, warm, os.path.join(tmp, f"warm-out{k}"))
    slice_n = min(n, 100_000 if not quick else 20_000)
    pattern = r"(?i)\b(" + "|".join(re.escape(c) for c in classes) + r")\b"
    df = spark.createDataFrame(pa.table({"caption": caps[:slice_n]}).to_pandas())
    df.cache().count()
    for _ in range(3):  # JVM warm-up: the regex engine and Spark's generated code
        df.filter(df.caption.rlike(pattern)).limit(2000).count()
    # The two Spark rows run in turns (end to end, then rlike, five times): this shared
    # machine's speed drifts over minutes, and their ratio is what the issue asks for.
    runs, rlike_s = [], []
    for k in range(1 if quick else 5):
        out = os.path.join(tmp, f"out{k}")
        t0 = time.perf_counter()
        stats = run_text_filter(cfg, dataset, meta, out)
        runs.append((time.perf_counter() - t0, stats))
        shutil.rmtree(out)
        t0 = time.perf_counter()
        hits = df.filter(df.caption.rlike(pattern)).count()
        rlike_s.append(time.perf_counter() - t0)
    ratios = sorted((n / e) / (slice_n / r) for (e, _), r in zip(runs, rlike_s))
    runs.sort(key=lambda r: r[0])
    seconds, stats = runs[len(runs) // 2]
    t = stats["timings"]
    spread = f"; runs {runs[0][0]:.2f}-{runs[-1][0]:.2f} s" if len(runs) > 1 else ""
    # The rate inside the scan tasks (their summed time shared by the two cores): what a long
    # job approaches once Spark's fixed cost per job (~0.15 s here) and the driver's are spread.
    in_tasks = n / (t["task_total_s"] / 2) / 1e6
    note = (
        f"{stats['rows_matched']:,} kept; {stats['scan_units']} unit(s) in {stats['scan_tasks']} task(s), scan {t['scan_wall_s']:.1f} s "
        f"(in tasks {in_tasks:.2f}M/s), global {t['global_s']:.1f} s{spread}"
    )
    add("primer filter, local[2]", n, seconds, note)
    rlike_s.sort()
    spread = f"; runs {rlike_s[0]:.1f}-{rlike_s[-1]:.1f} s" if len(rlike_s) > 1 else ""
    add(
        "Spark rlike alternation",
        slice_n,
        rlike_s[len(rlike_s) // 2],
        f"slice, {hits:,} hits{spread}",
    )

    loop_n = min(n, 3000)
    regs = [re.compile(r"\b" + re.escape(c.lower()) + r"\b") for c in classes]
    t0 = time.perf_counter()
    for c in caps[:loop_n]:
        low = c.lower()
        [r.search(low) for r in regs]
    add("per-class Python loop", loop_n, time.perf_counter() - t0, "slice")

    base = _vs_matcher(rows)
    print(table(rows, cols))
    ratio = ratios[len(ratios) // 2]
    each = (
        " (run by run: " + ", ".join(f"{r:.0f}x" for r in ratios) + ")" if len(ratios) > 1 else ""
    )
    summary = f"primer filter vs Spark rlike: {ratio:.0f}x{each}; matcher vs bare read: {base / rows[0]['captions/s']:.2f}"
    print("\n" + summary)
    record("text_filter", rows, cols, args, note=f"{dataset}, {n:,} captions; {summary}")


def _vs_matcher(rows: list[dict]) -> float:
    """Adds each row's speed relative to the matcher with the default engine (row 1)."""
    base = rows[1]["captions/s"]
    for r in rows:
        r["vs matcher"] = r["captions/s"] / base
    return base


def _two_process_floor(meta: str, files: int, rules, turns: int) -> tuple[float, str]:
    """Seconds (median over ``turns``) for two processes at once, each over half the files, to
    do what a scan task cannot skip: read the columns it needs and match the captions. With
    Spark, the row filters, uids and the parquet write on top, this bounds the end-to-end
    rate of local[2] here (the two vCPUs share one core, so this is not 2x the matcher row)."""
    import multiprocessing as mp

    paths = [os.path.join(meta, f"part-{i}.parquet") for i in range(files)]
    half = -(-files // 2)
    ctx = mp.get_context("spawn")  # a clean interpreter, as a Spark worker has
    q, barrier = ctx.Queue(), ctx.Barrier(2)
    procs = [
        ctx.Process(target=_floor_worker, args=(part, rules, barrier, turns, q))
        for part in (paths[:half], paths[half:])
    ]
    for p in procs:
        p.start()
    times = [q.get(), q.get()]
    for p in procs:
        p.join()
    walls = sorted(max(a, b) for a, b in zip(*times))
    spread = f"; runs {walls[0]:.2f}-{walls[-1]:.2f} s" if len(walls) > 1 else ""
    return walls[len(walls) // 2], spread


def _floor_worker(paths: list[str], rules, barrier, turns: int, q) -> None:
    from pipeline.text_filter.batch import resolve_columns
    from pipeline.text_filter.config import TextFilterConfig
    from pipeline.text_filter.scan import _matcher

    cfg = TextFilterConfig()
    matcher = _matcher(rules, cfg.engine)

    def scan() -> None:
        for path in paths:
            pf = pq.ParquetFile(path)
            cols = resolve_columns(pf.schema_arrow, cfg.columns, path)
            for b in pf.iter_batches(cfg.batch_rows, columns=sorted(set(cols.values()))):
                matcher.match(b.column(cols["caption"]))

    scan()  # warm: numba's kernel loaded, the files in the page cache
    times = []
    for _ in range(turns):
        barrier.wait()  # both start together, as a job's two tasks do
        t0 = time.perf_counter()
        scan()
        times.append(time.perf_counter() - t0)
    q.put(times)


if __name__ == "__main__":
    main()
