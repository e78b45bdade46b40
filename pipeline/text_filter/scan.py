"""The scan, inside Spark tasks: each task reads its units with pyarrow (Arrow's own file where
local, else fsspec), in record batches of the needed columns, runs the batch core on them and
writes ``<out>/_scan/part-<index>.parquet``, the matches' keys and the unit's stats (last, the
resume marker). A rerun reuses the units whose marker exists, when its inputs fingerprint
(:func:`check_scan_fingerprint`) is unchanged.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import io
from pipeline.text_filter.batch import (
    _empty_output,
    _filter_batch,
    match_keys,
    resolve_columns,
    split_per_class,
)
from pipeline.text_filter.config import SCAN_DIR, TextFilterConfig
from pipeline.text_filter.global_filters import _first_of_runs, _sort_keys
from pipeline.text_filter.parts import (
    _keys_path,
    _piece_paths,
)
from pipeline.text_filter.plan import ScanUnit
from pipeline.text_filter.terms import MatchRules

log = logging.getLogger(__name__)


def _write_part(table: pa.Table, f) -> None:
    """A part as :func:`pipeline.core.io.write_parquet` writes one (zstd) into the open file ``f``,
    with dictionary pages only for the low-cardinality columns: dictionaries of uids, URLs and
    captions cost a fifth of the write time and save nothing."""
    pq.write_table(
        table,
        f,
        compression="zstd",
        use_dictionary=["label", "class_name", "matched_term", "source_file"],
        # Min/max of URLs and captions prune nothing and cost a share of the write.
        write_statistics=[c for c in table.column_names if c not in ("url", "caption")],
    )


# The matcher of the last dataset, per process: a Spark worker runs many scan tasks of one job,
# and building the terms of many classes again in every task would cost each of them time.
_MATCHER: dict = {}


def _matcher(rules: MatchRules, engine: str):
    from pipeline.text_filter.matcher import Matcher

    key = (rules.key(), engine)
    if key not in _MATCHER:
        _MATCHER.clear()
        _MATCHER[key] = Matcher.from_rules(rules, engine=engine)
    return _MATCHER[key]


def _open_input(url: str):
    """An input file for reading: Arrow's own file for a local path (column chunks read
    straight into Arrow buffers; through a Python file object each read is copied once more,
    a tenth of the read time), else the fsspec file."""
    fs, path = io.url_to_fs(url)
    return pa.OSFile(path, "rb") if io.is_local(url) else fs.open(path, "rb")


def scan_file(
    index: int,
    url: str,
    out: str,
    cfg: TextFilterConfig,
    rules: MatchRules,
    publish: Callable[[Callable[[], None]], None] | None = None,
    row_groups: tuple[int, int] | None = None,
) -> dict:
    """Scan one input file, or its row groups ``[lo, hi)`` (``row_groups``), into
    ``<out>/_scan/part-<index>.parquet`` and return its stats.

    Reuses a completed scan part (its stats file is written after the part and its keys). With
    ``skip_bad_files`` an unreadable file is reported in the stats instead of raising.
    ``publish`` takes the step that makes the written part, keys and stats durable and visible
    (:func:`scan_files` runs it on another thread); without it, the step runs before returning.
    """
    part, stats_url = _piece_paths(out, index)
    if io.exists(stats_url):
        return io.read_json(stats_url)
    where, piece = url, {}
    if row_groups is not None:
        where = f"{url} (row groups {row_groups[0]}-{row_groups[1] - 1})"
        piece = {"row_groups": list(row_groups)}
    t0 = time.perf_counter()
    stats: Counter = Counter()
    timings = {"read_s": 0.0, "match_s": 0.0, "write_s": 0.0}
    # Only reading is guarded: a file that cannot be read is bad input (named, or skipped and
    # listed); an error in the matching code is a bug and always fails the job.
    tables, uid_digests = [], []
    matcher = _matcher(rules, cfg.engine)
    classes = list(rules.classes)
    try:
        with _open_input(url) as fh:
            pf = pq.ParquetFile(fh)
            cols = resolve_columns(pf.schema_arrow, cfg.columns, url)
            # The file row of the next batch: a piece starts after the row groups before it.
            next_row = (
                sum(pf.metadata.row_group(g).num_rows for g in range(row_groups[0]))
                if row_groups
                else 0
            )
            batches = pf.iter_batches(
                batch_size=cfg.batch_rows,
                row_groups=None if row_groups is None else range(*row_groups),
                columns=sorted(set(cols.values())),
            )
            while True:
                t = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                finally:
                    timings["read_s"] += time.perf_counter() - t
                t = time.perf_counter()
                try:
                    table, digests = _filter_batch(
                        batch, cols, matcher, cfg, classes, stats, url, next_row
                    )
                    next_row += batch.num_rows
                    tables.append(table)
                    uid_digests.append(digests)
                except Exception as e:  # not a read error: never skipped as a bad file
                    raise RuntimeError(f"{where}: text filter failed on a batch: {e!r}") from e
                timings["match_s"] += time.perf_counter() - t
    except io.InputError:
        raise
    except (OSError, pa.ArrowException, ValueError) as e:
        if not cfg.skip_bad_files:
            raise io.InputError(f"{where}: cannot read parquet ({type(e).__name__}: {e})") from e
        result = {"file": url, **piece, "bad_file": f"{type(e).__name__}: {e}"}
        io.write_json(stats_url, result)
        return result
    table = pa.concat_tables(tables) if tables else _empty_output(cols)
    t = time.perf_counter()
    # Repeats of a (uid, label) (the same row twice in a file) dropped, the first kept; rows
    # stay in file order. numpy over the keys' integer words, no string sort.
    keys = match_keys(table, np.concatenate(uid_digests) if uid_digests else None)
    # Contiguous columns: the packed records' fields are unaligned, slow to index.
    hi, lo, lab = (np.ascontiguousarray(keys[f]) for f in ("uid_hi", "uid_lo", "label"))
    order = _sort_keys(hi, lo, lab, np.arange(len(keys)))
    first = _first_of_runs(hi[order], lo[order], lab[order])
    if not first.all():
        keep = np.zeros(len(keys), dtype=bool)
        keep[order[first]] = True
        table, keys = table.filter(pa.array(keep)), keys[keep]
    stats["dropped_duplicate_row"] += stats["rows_matched"] - table.num_rows
    stats["rows_matched"] = table.num_rows
    # Keys in a file of their own, not in the task's result: collected results are capped
    # (spark.driver.maxResultSize, 1 GB by default), and a resumed run finds them here too.
    staged: list[io.StagedFile] = []

    def commit() -> None:
        t = time.perf_counter()
        try:
            for s in staged:  # the part and its keys durable (or uploaded) before the marker
                s.commit()
        finally:
            for s in staged:  # no temporary left behind by one not reached (a no-op if done)
                s.discard()
        result["timings"]["publish_s"] = time.perf_counter() - t
        io.write_json(stats_url, result)

    # Until the commit step is handed over, any error (an interrupt included) discards the
    # temporaries: on object stores they are local files no rerun would find.
    try:
        staged.append(io.StagedFile(part))
        staged.append(io.StagedFile(_keys_path(out, index)))
        with staged[0].open() as f:
            _write_part(table, f)
        with staged[1].open() as f:
            f.write(keys.view(np.uint8))  # its bytes, not a copy
        timings["write_s"] += time.perf_counter() - t
        labels, label_counts = np.unique(keys["label"], return_counts=True)
        counts, per_class_counts = split_per_class(stats)
        result = {
            "file": url,
            **piece,
            "counts": counts,
            **per_class_counts,
            "per_class": {str(k): int(v) for k, v in zip(labels.tolist(), label_counts.tolist())},
            # publish_s, the commit's own time, is added by it (and so is in the marker).
            "timings": {**timings, "total_s": time.perf_counter() - t0},
        }
        if publish is None:
            commit()
        else:
            publish(commit)
    except BaseException:
        for s in staged:
            s.discard()
        raise
    return result


def scan_files(
    files: list[ScanUnit] | list[tuple[int, str]],
    out: str,
    cfg: TextFilterConfig,
    rules: MatchRules,
) -> list[dict]:
    """:func:`scan_file` over one task's scan units (:class:`ScanUnit`, or ``(index, url)``
    for whole files) in order; their stats.

    Each file's commit (fsync and rename, or upload to an object store, of its part and keys,
    then its stats marker) runs on a background thread while the next file is scanned: a
    local disk's fsyncs, and longer an object store's uploads, would otherwise leave the core
    idle. The task returns once every commit is done.
    A failed commit stops the task before its next file, with that error; a file whose commit
    failed has no marker and is rescanned by a rerun. When a scan fails, the commits still
    pending finish first (the files before it keep their markers), and any of them that
    failed are logged and noted on the scan's error.
    """
    from concurrent.futures import ThreadPoolExecutor, wait

    results = []
    pending: list = []

    def raise_failed() -> None:
        for p in pending:
            if p.done() and p.exception() is not None:
                raise p.exception()

    # One thread: commits run in file order.
    with ThreadPoolExecutor(1, thread_name_prefix="primer-commit") as pool:

        def publish(step: Callable[[], None]) -> None:
            pending.append(pool.submit(step))

        try:
            for unit in files:
                raise_failed()  # no more work behind a commit that failed (a full disk)
                index, url, *rest = unit
                results.append(
                    scan_file(index, url, out, cfg, rules, publish, rest[0] if rest else None)
                )
            wait(pending)
            raise_failed()
            _freeze_worker_heap()
        except BaseException as e:
            wait(pending)
            for p in pending:
                err = p.exception()
                if err is not None and err is not e:
                    log.error("text filter: publishing a scan part failed: %r", err)
                    e.add_note(f"also, publishing a scan part failed: {err!r}")
            raise
    return results


_heap_frozen = False


def _freeze_worker_heap() -> None:
    """In a Spark task, once per Python worker: move the objects alive after its first scan
    (numba's and pyarrow's modules, the compiled kernels, the cached matcher) out of the
    garbage collector's reach (``gc.freeze``).

    PySpark's daemon runs ``gc.collect()`` in a reused worker after every task, before it
    takes the next. A full collection walks every tracked object, and there are many once
    numba is loaded: most of the gap between one task and the next on each worker. Frozen, it
    walks only what later tasks leave. Not in the driver or a test process, whose objects a freeze would keep forever.
    """
    global _heap_frozen
    if _heap_frozen:
        return
    try:
        from pyspark import TaskContext
    except ImportError:  # not in a Spark worker, then
        return
    if TaskContext.get() is None:
        return
    gc.freeze()
    _heap_frozen = True


def _check_scan_fingerprint(out: str, inputs: dict) -> None:
    """Reuse the scan parts of a failed run only when they came from the same inputs.

    A rerun with other files, classes or settings must not mix in stale parts: the scan
    directory is cleared when its recorded fingerprint differs.
    """
    import json

    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    url = io.join(out, SCAN_DIR, "_inputs.json")
    if io.exists(url):
        if io.read_json(url).get("sha256") == digest:
            log.info("resuming: reusing finished scans in %s", io.join(out, SCAN_DIR))
            return
        log.warning("inputs or settings changed since the failed run; rescanning everything")
    io.remove(io.join(out, SCAN_DIR))
    io.write_json(url, {"sha256": digest})
