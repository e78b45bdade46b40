"""Stage 1: keep the LAION rows whose captions name a target class (Spark over parquet).

:func:`run_text_filter` reads as its four steps: :func:`plan` (list the inputs, check their
footers, cut them into scan units), :func:`scan` (Spark tasks match every unit's captions,
:mod:`~pipeline.text_filter.scan`), :func:`global_filters` (the driver de-duplicates and caps
over the matches' keys, :mod:`~pipeline.text_filter.global_filters`) and :func:`write` (parts
placed or rewritten, stats, ``_SUCCESS`` last, :mod:`~pipeline.text_filter.write`).

Output at ``--out``: ``part-<unit index>.parquet`` (columns in docs/architecture.md),
``_stats.json``, ``_config.json`` and ``_SUCCESS``. The JSON files carry a leading underscore
so that ``pyarrow.dataset.dataset(out)`` (which skips ``_``/``.`` names) reads the parts alone.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from pipeline.core import fingerprint, io
from pipeline.core.config import DatasetSpec, load_dataset, to_dict
from pipeline.text_filter.batch import PER_CLASS
from pipeline.text_filter.config import CONFIG, SCAN_DIR, SCAN_FORMAT, STATS, TextFilterConfig
from pipeline.text_filter.global_filters import global_pass
from pipeline.text_filter.parts import (
    _keep_path,
    _scanned_indices,
)
from pipeline.text_filter.plan import ScanUnit, check_inputs, plan_units, task_groups
from pipeline.text_filter.scan import _check_scan_fingerprint, scan_files
from pipeline.text_filter.terms import MatchRules
from pipeline.text_filter.write import _publish_part, finalize_part

PER_CLASS_KEYS = [f"per_class_{k}" for k in PER_CLASS]

log = logging.getLogger(__name__)

# The output's layout (parts, columns, stats files); an output of another is never reused.
OUTPUT_FORMAT = 1


@dataclass
class Plan:
    """What the scan will read: the input ``files`` (sorted), the unreadable ones (``bad``,
    file -> reason), the scan ``units`` and each unit's rows (``unit_rows``)."""

    files: list[str]
    bad: dict[str, str]
    units: list[ScanUnit]
    unit_rows: dict[int, int]


@dataclass
class Scanned:
    """The scan's outcome: per unit its stats (``results``, in unit order), the units whose
    file is good (``done``) and their match counts, the Spark tasks, the wall time, and the
    per-class counts of excluded, contradicted and family rows."""

    results: list[dict]
    done: list[int]
    matched: list[int]
    counts: Counter
    timings: Counter
    tasks: int
    seconds: float
    per_class: dict[str, Counter]  # "per_class_excluded" ... -> label -> rows


def plan(cfg: TextFilterConfig, spec: DatasetSpec, metadata: str, out: str) -> Plan:
    """List and check the inputs, cut them into scan units, and clear the scans of a failed run
    made from other inputs or settings (a matching one is resumed)."""
    files = io.list_files(metadata, suffixes=(".parquet",))
    _, bad, row_groups = check_inputs(files, cfg)  # row_groups: the readable files
    # Units follow the sorted input list and the footers, so part names are stable across
    # reruns (the fingerprint below holds them).
    units, unit_rows = plan_units(files, row_groups, cfg.split_rows)
    log.info(
        "text filter: %d files (%d unreadable) in %d scan units, %d classes -> %s",
        len(files), len(bad), len(units), spec.num_classes, out,
    )  # fmt: skip
    _check_scan_fingerprint(
        out,
        {
            # task_rows only regroups the work, and split_rows acts through the units: a rerun
            # with others that cut the files the same way reuses the scans. global_memory_mb
            # changes only how the driver works (a rerun after it ran out of memory, with a
            # smaller budget, reuses them too).
            "config": {
                k: v
                for k, v in to_dict(cfg).items()
                if k not in ("task_rows", "split_rows", "global_memory_mb")
            },
            # Every match rule: a changed exclusion list, family or kind word rescans.
            "rules": MatchRules.from_spec(spec).to_dict(),
            "files": files,
            "units": [list(u) for u in units],
            "scan_format": SCAN_FORMAT,
        },
    )
    return Plan(files, bad, units, unit_rows)


def scan(p: Plan, cfg: TextFilterConfig, spec: DatasetSpec, out: str, sc) -> Scanned:
    """Scan every unit not yet scanned in Spark tasks (results come back in unit order); a file
    with an unreadable piece is left out whole, as when it is one unit."""
    from pipeline.core.spark import JobProgress, in_task, task_error_message

    rules = MatchRules.from_spec(spec)
    options = io.configured()
    # Units a failed run already scanned (their stats marker exists) cost nothing: grouped by
    # the rows still to scan only.
    scanned = _scanned_indices(out, [u.index for u in p.units])
    pending = {u.index: p.unit_rows[u.index] for u in p.units if u.index not in scanned}
    groups = task_groups(p.units, pending, cfg.task_rows, sc.defaultParallelism)
    t0 = time.perf_counter()
    try:
        with JobProgress(sc, "scan", len(groups)):
            results = (
                sc.parallelize(groups, max(1, len(groups)))
                .flatMap(lambda g: in_task(options, scan_files, g, out, cfg, rules))
                .collect()
            )
    except Exception as e:
        raise io.InputError(task_error_message(e, "text filter")) from None
    seconds = time.perf_counter() - t0
    for r in results:
        if "bad_file" in r:
            p.bad.setdefault(r["file"], r["bad_file"])
    good = [(u, r) for u, r in zip(p.units, results) if u.url not in p.bad]
    counts: Counter = Counter()
    timings: Counter = Counter()
    per_class: dict[str, Counter] = {k: Counter() for k in PER_CLASS_KEYS}
    for _, r in good:
        counts.update(r.get("counts", {}))
        for k in PER_CLASS_KEYS:
            per_class[k].update({int(c): int(v) for c, v in r.get(k, {}).items()})
    for r in results:
        timings.update(r.get("timings", {}))
    done = [u.index for u, _ in good]
    matched = [int(r["counts"]["rows_matched"]) for _, r in good]
    return Scanned(results, done, matched, counts, timings, len(groups), seconds, per_class)


def global_filters(
    s: Scanned, cfg: TextFilterConfig, spec: DatasetSpec, out: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """The global filters over the keys of every match: ``(kept mask over the matches in part
    order, kept rows per class, URL buckets used)``; their drop counts join ``s.counts``."""
    kept, gcounts, per_class, buckets = global_pass(out, s.done, s.matched, cfg, spec.num_classes)
    s.counts.update(gcounts)
    return kept, per_class, buckets


def write(s: Scanned, kept: np.ndarray, out: str, sc) -> int:
    """Place the final parts: a part that loses no row is linked or copied into place, the
    others are rewritten by Spark tasks from the kept row numbers. Returns the rows kept."""
    from pipeline.core.progress import progress
    from pipeline.core.spark import JobProgress, in_task

    rewrite = []
    options = io.configured()
    part_rows = dict(zip(s.done, s.matched))
    first = 0  # the mask runs over the parts' records in order: a part's slice marks its rows
    for i, m in progress(list(zip(s.done, s.matched)), desc="place parts", unit="part"):
        rows = np.flatnonzero(kept[first : first + m]).astype("<i8")
        first += m
        if len(rows) == m:
            _publish_part(i, out)
        else:
            io.write_bytes(_keep_path(out, i), rows.tobytes())
            rewrite.append(i)
    total_kept = int(kept.sum())
    if rewrite:
        with JobProgress(sc, "rewrite parts", len(rewrite), unit="part"):
            rewritten = (
                sc.parallelize(rewrite, len(rewrite))
                .map(lambda i: in_task(options, finalize_part, i, out))
                .collect()
            )
        if sum(rewritten) != total_kept - sum(part_rows[i] for i in s.done if i not in rewrite):
            raise RuntimeError("text filter: rewritten parts disagree with the kept keys")
    return total_kept


def run_text_filter(
    cfg: TextFilterConfig,
    dataset: str,
    metadata: str,
    out: str,
    master: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Run stage 1: plan -> scan -> global filters -> write. Returns the stats dict (also
    written to ``<out>/_stats.json``).

    Raises :class:`pipeline.core.io.InputError` for a missing input, a missing column or
    (without ``skip_bad_files``) an unreadable file, naming the file. A failed run leaves no
    ``_SUCCESS``; the rerun reuses finished scan units when the files, classes and settings
    are unchanged (and rescans everything otherwise).
    """
    spec = load_dataset(dataset, descriptions=False)
    check_metadata(metadata)
    fp = fingerprint.make(
        "filter",
        OUTPUT_FORMAT,
        fingerprint.result_settings(cfg),
        {"metadata": fingerprint.file_identity(metadata, (".parquet",))},
        # Every rule the matches follow (exclusions, families, kinds, years), not just names.
        dataset={
            **spec.identity("classes", "synonyms"),
            "rules": MatchRules.from_spec(spec).to_dict(),
        },
    )
    if not fingerprint.prepare(out, fp, overwrite):
        return io.read_json(io.join(out, STATS))
    t0 = time.perf_counter()
    p = plan(cfg, spec, metadata, out)
    from pipeline.core.spark import get_spark

    sc = get_spark(master, app_name=f"primer-filter-{spec.name}").sparkContext
    s = scan(p, cfg, spec, out, sc)
    t_global = time.perf_counter()
    kept, per_class, buckets = global_filters(s, cfg, spec, out)
    total_kept = write(s, kept, out, sc)
    del kept
    stats = _stats(p, s, spec, total_kept, per_class, buckets)
    stats["timings"].update(
        global_s=round(time.perf_counter() - t_global, 3),
        total_s=round(time.perf_counter() - t0, 3),
    )
    io.write_json(io.join(out, CONFIG), {"dataset": dataset, "metadata": metadata, **to_dict(cfg)})
    io.write_json(io.join(out, STATS), stats)
    io.mark_done(out, {"rows": stats["rows_matched"]})
    io.remove(io.join(out, SCAN_DIR))
    log.info(
        "text filter: %d rows scanned, %d matched (%s) in %.1f s",
        stats["rows_scanned"], stats["rows_matched"], stats["dropped"], stats["timings"]["total_s"],
    )  # fmt: skip
    return stats


def _stats(
    p: Plan, s: Scanned, spec: DatasetSpec, kept: int, per_class: np.ndarray, buckets: int
) -> dict:
    counts, timings = s.counts, s.timings
    return {
        "dataset": spec.name,
        "files": len(p.files),
        "scan_units": len(p.units),
        "scan_tasks": s.tasks,
        "global_buckets": buckets,
        "bad_files": p.bad,
        "rows_scanned": int(counts.get("rows_scanned", 0)),
        "rows_matched_before_global_filters": int(counts.get("rows_matched", 0)),
        "rows_matched": kept,
        "dropped": {
            k[len("dropped_") :]: int(v)
            for k, v in sorted(counts.items())
            if k.startswith("dropped_")
        },
        "per_class": {spec.classes[c]: int(per_class[c]) for c in range(spec.num_classes)},
        "empty_classes": [spec.classes[c] for c in range(spec.num_classes) if not per_class[c]],
        # Matches (before the global filters) whose caption names a family of classes, not
        # which member: kept with all of them as candidates (the image stage picks).
        "family_rows": int(counts.get("rows_family", 0)),
        **{
            k: {spec.classes[c]: n for c, n in sorted(s.per_class[k].items())}
            for k in PER_CLASS_KEYS
        },
        "timings": {
            "scan_wall_s": round(s.seconds, 3),
            "task_read_s": round(timings.get("read_s", 0.0), 3),
            "task_match_s": round(timings.get("match_s", 0.0), 3),
            "task_write_s": round(timings.get("write_s", 0.0), 3),
            # fsync and rename (or upload) of the parts and keys, beside the scanning.
            "task_publish_s": round(timings.get("publish_s", 0.0), 3),
            # Summed over scan units, and the slowest unit (the scan's wall time cannot beat it).
            "task_total_s": round(timings.get("total_s", 0.0), 3),
            "task_max_s": round(
                max((r.get("timings", {}).get("total_s", 0.0) for r in s.results), default=0.0), 3
            ),
        },
    }


def check_metadata(metadata: str) -> None:
    """Refuse metadata that is not parquet, naming the fix (the filter reads parquet only)."""
    if metadata.lower().rstrip("/").endswith((".csv", ".tsv", ".json", ".jsonl", ".txt")):
        raise io.InputError(
            f"metadata {metadata!r} is not parquet: the text filter reads parquet files (convert "
            "with pyarrow: pyarrow.parquet.write_table(pyarrow.csv.read_csv(path), out))"
        )
    try:
        io.list_files(metadata, suffixes=(".parquet",))
    except FileNotFoundError:
        try:
            others = io.list_files(metadata)
        except FileNotFoundError:
            others = []
        what = f" (found {len(others)} other files, e.g. {others[0]!r})" if others else ""
        raise io.InputError(
            f"no parquet files at {metadata!r}{what}; give LAION parquet files: a file, a "
            "directory, a glob or a URL (s3://, hf://, ...)"
        ) from None
