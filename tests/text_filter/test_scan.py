"""The text filter's scan tasks and its resume: each file published while the next is scanned,
failed commits, scan errors, reuse of a failed run's finished scans only for the same inputs
and settings, a driver dying in its global pass, and the worker's frozen heap."""

from __future__ import annotations

import os

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.core import io
from pipeline.text_filter import global_filters as tfglobal
from pipeline.text_filter import parts as tfparts
from pipeline.text_filter import scan as tfscan
from pipeline.text_filter.config import TextFilterConfig
from pipeline.text_filter.stage import run_text_filter
from pipeline.text_filter.terms import MatchRules
from tests.text_filter.helpers import (
    CLASSES,
    KNOWN,
    RULES,
    garble_captions,
    part_bytes,
    split_input,
    three_files,
    write_rows,
)

pytestmark = pytest.mark.usefixtures("spark")


def test_a_task_publishes_each_file_while_it_scans_the_next(tmp_path, monkeypatch):
    """scan_files commits a file (fsync/rename or upload, then its marker) on a background
    thread: the first file's commit can wait for the second file's scan to start."""
    import threading

    files = three_files(tmp_path)
    second_started = threading.Event()
    overlapped = []
    real_scan, real_commit = tfscan.scan_file, io.StagedFile.commit

    def scan(index, *args, **kwargs):
        if index == 1:
            second_started.set()
        return real_scan(index, *args, **kwargs)

    def commit(self):
        if self.url.endswith("part-00000.parquet"):
            overlapped.append(second_started.wait(10))  # a synchronous commit waits in vain
        real_commit(self)

    monkeypatch.setattr(tfscan, "scan_file", scan)
    monkeypatch.setattr(io.StagedFile, "commit", commit)
    out = str(tmp_path / "out")
    results = tfscan.scan_files(files, out, TextFilterConfig(), RULES)
    assert overlapped == [True]
    assert [r["file"] for r in results] == [f for _, f in files]
    for i in range(3):  # every file published, marker included, when the task returns
        part, stats = tfparts._piece_paths(out, i)
        assert io.exists(part) and io.exists(tfparts._keys_path(out, i))
        assert io.read_json(stats) == results[i]
    # The same bytes as scanning one file at a time, committing before the next.
    ref = str(tmp_path / "ref")
    for i, f in files:
        real_scan(i, f, ref, TextFilterConfig(), RULES)
    for i in range(3):
        for a, b in zip(tfparts._piece_paths(out, i)[:1] + (tfparts._keys_path(out, i),),
                        tfparts._piece_paths(ref, i)[:1] + (tfparts._keys_path(ref, i),)):  # fmt: skip
            assert io.read_bytes(a) == io.read_bytes(b)


def test_a_failed_commit_fails_the_task_and_leaves_that_file_unmarked(tmp_path, monkeypatch):

    files = three_files(tmp_path)
    real_commit = io.StagedFile.commit

    def commit(self):
        if self.url.endswith("part-00001.keys"):
            raise OSError("disk full")
        real_commit(self)

    monkeypatch.setattr(io.StagedFile, "commit", commit)
    out = str(tmp_path / "out")
    with pytest.raises(OSError, match="disk full"):
        tfscan.scan_files(files, out, TextFilterConfig(), RULES)
    assert io.exists(tfparts._piece_paths(out, 0)[1])  # the file before it is whole and marked
    assert not io.exists(tfparts._piece_paths(out, 1)[1])  # no marker without its keys
    assert not io.exists(tfparts._keys_path(out, 1))
    # Each marker vouches for its own file only: the one after the failure is published
    # whole or not at all (the task stops before it if the failure came first).
    marked = io.exists(tfparts._piece_paths(out, 2)[1])
    assert (
        marked
        == io.exists(tfparts._keys_path(out, 2))
        == io.exists(tfparts._piece_paths(out, 2)[0])
    )
    assert not [n for n in os.listdir(os.path.join(out, "_scan")) if ".tmp-" in n]
    monkeypatch.setattr(io.StagedFile, "commit", real_commit)
    rerun = tfscan.scan_files(files, out, TextFilterConfig(), RULES)
    clean = tfscan.scan_files(files, str(tmp_path / "clean"), TextFilterConfig(), RULES)
    strip = [{k: v for k, v in r.items() if k != "timings"} for r in rerun]
    assert strip == [{k: v for k, v in r.items() if k != "timings"} for r in clean]


def test_a_failed_commit_stops_the_task_before_its_next_file(tmp_path, monkeypatch):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    files = three_files(tmp_path)
    second_started, failed = threading.Event(), threading.Event()
    scanned = []
    real_scan, real_commit = tfscan.scan_file, io.StagedFile.commit
    real_submit = ThreadPoolExecutor.submit

    def commit(self):
        if self.url.endswith("part-00000.parquet"):
            second_started.wait(10)  # fails while file 1 is scanned, not before it starts
            raise OSError("disk full")
        real_commit(self)

    def submit(pool, fn, *args, **kwargs):
        future = real_submit(pool, fn, *args, **kwargs)
        # Set once the failure is recorded on the future (a callback runs after that).
        future.add_done_callback(lambda f: f.exception() is not None and failed.set())
        return future

    def scan(index, *args, **kwargs):
        scanned.append(index)
        if index == 1:
            second_started.set()
        result = real_scan(index, *args, **kwargs)
        if index == 1:
            assert failed.wait(10)  # file 0's commit has failed by the time file 1 is done
        return result

    monkeypatch.setattr(io.StagedFile, "commit", commit)
    monkeypatch.setattr(ThreadPoolExecutor, "submit", submit)
    monkeypatch.setattr(tfscan, "scan_file", scan)
    out = str(tmp_path / "out")
    with pytest.raises(OSError, match="disk full"):
        tfscan.scan_files(files, out, TextFilterConfig(), RULES)
    assert scanned == [0, 1]  # file 2 never scanned
    assert not io.exists(tfparts._piece_paths(out, 0)[1])
    assert io.exists(tfparts._piece_paths(out, 1)[1])  # already handed over: published
    assert not io.exists(tfparts._piece_paths(out, 2)[1])
    assert not [n for n in os.listdir(os.path.join(out, "_scan")) if ".tmp-" in n]


def test_a_scan_error_still_waits_for_the_earlier_files_commits(tmp_path, monkeypatch):
    import time as _time

    files = three_files(tmp_path)
    garble_captions(files[1][1])
    real_commit = io.StagedFile.commit

    def slow_commit(self):
        _time.sleep(0.3)  # the error is raised long before this commit ends
        real_commit(self)

    monkeypatch.setattr(io.StagedFile, "commit", slow_commit)
    out = str(tmp_path / "out")
    with pytest.raises(io.InputError, match="p1.parquet"):
        tfscan.scan_files(files, out, TextFilterConfig(), RULES)
    assert io.exists(tfparts._piece_paths(out, 0)[1])  # published before the task failed
    assert not io.exists(tfparts._piece_paths(out, 1)[1])


def test_a_commit_failing_behind_a_scan_error_is_reported_with_it(tmp_path, monkeypatch, caplog):
    import time as _time

    files = three_files(tmp_path)
    garble_captions(files[1][1])

    def failing_commit(self):
        _time.sleep(0.3)  # still running when the next file's scan fails
        raise OSError("disk full")

    monkeypatch.setattr(io.StagedFile, "commit", failing_commit)
    with pytest.raises(io.InputError, match="p1.parquet") as err:
        tfscan.scan_files(files, str(tmp_path / "out"), TextFilterConfig(), RULES)
    assert any("disk full" in n for n in getattr(err.value, "__notes__", []))
    assert "disk full" in caplog.text


def test_scan_parts_left_without_a_fingerprint_are_not_trusted(tmp_path, dataset_yaml):
    """A scan part with its marker but no record of the inputs it came from (here scanned with
    other settings) is rescanned, not reused; the output is a clean run's. (Reuse of a failed
    run's finished scans: test_a_run_failing_after_its_scan_resumes_from_the_finished_pieces.)"""
    from pipeline.demo.synthetic import laion_table

    d = write_rows(tmp_path, "in", KNOWN)  # one ambiguous caption: keep_ambiguous changes the part
    pq.write_table(laion_table(300, CLASSES, seed=1), os.path.join(d, "part-1.parquet"))
    out = str(tmp_path / "out")
    run_text_filter(TextFilterConfig(), dataset_yaml, d, str(tmp_path / "clean"))
    from pipeline.text_filter.scan import scan_file

    io.makedirs(out)
    files = io.list_files(d, suffixes=(".parquet",))
    scan_file(0, files[0], out, TextFilterConfig(keep_ambiguous=True), RULES)
    run_text_filter(TextFilterConfig(), dataset_yaml, d, out)
    assert ds.dataset(out).to_table() == ds.dataset(str(tmp_path / "clean")).to_table()
    assert not os.path.exists(os.path.join(out, "_scan"))


def test_rerun_after_failure_with_other_settings_rescans(tmp_path, dataset_yaml):
    """Scan parts of a failed run are reused only for the same inputs and settings."""
    from pipeline.text_filter.scan import scan_file

    meta = write_rows(tmp_path, "in", KNOWN)
    out = str(tmp_path / "out")
    io.makedirs(out)
    files = io.list_files(meta, suffixes=(".parquet",))
    # A "failed run" that scanned with keep_ambiguous=True; the rerun keeps the default.
    io.write_json(io.join(out, "_scan", "_inputs.json"), {"sha256": "stale"})
    scan_file(
        0,
        files[0],
        out,
        TextFilterConfig(keep_ambiguous=True),
        MatchRules(tuple(CLASSES), {"golden retriever": ["goldie"]}),
    )
    stats = run_text_filter(TextFilterConfig(), dataset_yaml, meta, out)
    assert stats["rows_matched"] == 5 and stats["dropped"]["ambiguous"] == 1


def test_a_run_failing_after_its_scan_resumes_from_the_finished_pieces(
    tmp_path, dataset_yaml, monkeypatch
):
    """The scan of a split file finished, the job failed before _SUCCESS (in the driver's
    global pass), and one piece's marker is gone as if its task had died: the rerun scans that
    piece alone and writes what a clean run writes."""

    meta = split_input(tmp_path)
    cfg = TextFilterConfig(split_rows=500)
    out = str(tmp_path / "out")

    def boom(*a, **k):
        raise RuntimeError("driver died")

    monkeypatch.setattr(tfglobal, "global_keep_keys", boom)
    with pytest.raises(RuntimeError, match="driver died"):
        run_text_filter(cfg, dataset_yaml, meta, out)
    monkeypatch.undo()
    scan = os.path.join(out, "_scan")
    markers = sorted(p for p in os.listdir(scan) if p.endswith(".stats.json"))
    assert markers == [f"part-{i:05d}.stats.json" for i in range(4)]
    os.unlink(os.path.join(scan, markers[1]))
    kept = {m: os.stat(os.path.join(scan, m)).st_mtime_ns for m in markers if m != markers[1]}
    seen = {}
    real = io.remove

    def remove(url):  # look at the scan directory just before the driver clears it
        if url.rstrip("/") == scan:
            seen.update({m: os.stat(os.path.join(scan, m)).st_mtime_ns for m in kept})
            seen["redone"] = os.path.exists(os.path.join(scan, markers[1]))
        return real(url)

    monkeypatch.setattr(io, "remove", remove)
    stats = run_text_filter(cfg, dataset_yaml, meta, out)
    assert seen == {**kept, "redone": True}  # the finished pieces untouched, the lost one redone
    clean = str(tmp_path / "clean")
    assert run_text_filter(cfg, dataset_yaml, meta, clean)["per_class"] == stats["per_class"]
    assert part_bytes(out) == part_bytes(clean)


def test_a_driver_out_of_memory_reruns_in_buckets_on_the_same_scans(
    tmp_path, dataset_yaml, monkeypatch
):
    """The driver ran out of memory in its global pass after the scan: the rerun with a smaller
    global_memory_mb (in buckets) reuses every scan part and writes what a clean run writes."""

    meta = split_input(tmp_path)
    out = str(tmp_path / "out")

    def oom(*a, **k):
        raise MemoryError

    monkeypatch.setattr(tfglobal, "global_keep_keys", oom)
    with pytest.raises(MemoryError):
        run_text_filter(TextFilterConfig(split_rows=500), dataset_yaml, meta, out)
    monkeypatch.undo()
    scan = os.path.join(out, "_scan")
    before = {p: os.stat(os.path.join(scan, p)).st_mtime_ns for p in os.listdir(scan)}
    seen = {}
    real = io.remove

    def remove(url):  # look at the scan directory just before the driver clears it
        if url.rstrip("/") == scan:
            seen.update({p: os.stat(os.path.join(scan, p)).st_mtime_ns for p in before})
        return real(url)

    monkeypatch.setattr(io, "remove", remove)
    monkeypatch.setattr(tfglobal, "GLOBAL_BYTES_PER_MATCH", 1 << 14)
    cfg = TextFilterConfig(split_rows=500, global_memory_mb=1)
    stats = run_text_filter(cfg, dataset_yaml, meta, out)
    assert stats["global_buckets"] >= 8
    assert seen == before  # not one scan part, keys file or marker rewritten
    clean = str(tmp_path / "clean")
    monkeypatch.undo()
    run_text_filter(TextFilterConfig(split_rows=500), dataset_yaml, meta, clean)
    assert part_bytes(out) == part_bytes(clean)


def test_a_spark_worker_freezes_its_heap_once_and_the_driver_never(tmp_path, spark):
    """PySpark's daemon runs gc.collect() after every task in a reused worker; once a worker
    has scanned, its loaded objects are frozen, so that collection walks only what later
    tasks leave. scan_files outside a Spark task (driver, tests) freezes nothing."""
    import gc

    files = three_files(tmp_path)
    out = str(tmp_path / "out")

    def probe(group):
        import gc

        tfscan.scan_files(group, out, TextFilterConfig(), RULES)
        frozen = gc.get_freeze_count()
        tfscan.scan_files(group, out, TextFilterConfig(), RULES)  # resumed: no work
        return [(frozen, gc.get_freeze_count())]

    (frozen, again), = (
        spark.sparkContext.parallelize([files[:1]], 1).flatMap(probe).collect()
    )  # fmt: skip
    assert frozen > 10_000  # the worker's modules, kernels and matcher
    assert again == frozen  # once per worker
    before = gc.get_freeze_count()
    tfscan.scan_files(files[1:], out, TextFilterConfig(), RULES)
    assert gc.get_freeze_count() == before == 0
