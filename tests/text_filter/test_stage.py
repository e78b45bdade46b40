"""Issue 3: the text-filter stage end to end on a real local[2] Spark session."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.app.cli import main
from pipeline.core import io
from pipeline.text_filter import batch as tfbatch
from pipeline.text_filter import global_filters as tfglobal
from pipeline.text_filter import parts as tfparts
from pipeline.text_filter import scan as tfscan
from pipeline.text_filter.config import TextFilterConfig
from pipeline.text_filter.stage import run_text_filter
from pipeline.text_filter.terms import MatchRules

pytestmark = pytest.mark.usefixtures("spark")

CLASSES = ["tabby cat", "golden retriever", "desert rose", "rose"]
SYNONYMS = {"golden retriever": ["goldie"]}
RULES = MatchRules(tuple(CLASSES), SYNONYMS)


@pytest.fixture
def dataset_yaml(tmp_path):
    p = tmp_path / "pets.yaml"
    p.write_text(
        "name: Pets\nclasses: [tabby cat, golden retriever, desert rose, rose]\n"
        "templates: ['a photo of a {}.']\nsynonyms:\n  golden retriever: [goldie]\n"
    )
    return str(p)


KNOWN = [
    ("http://a.test/1.jpg", "My Tabby-Cat sleeping", "tabby cat"),
    ("http://a.test/2.jpg", "two golden retrievers", "golden retriever"),
    ("http://a.test/3.jpg", "Desert Rose (Adenium)", "desert rose"),
    ("http://a.test/4.jpg", "a red rose", "rose"),
    ("http://a.test/5.jpg", "tabby cat and rose", None),  # ambiguous
    ("http://a.test/6.jpg", "catalog page", None),
    ("http://a.test/7.jpg", None, None),
    ("http://a.test/8.jpg", "", None),
    ("http://a.test/9.jpg", "goldie at the beach", "golden retriever"),
]


def _write(tmp_path, name, rows, schema="laion2b"):
    from pipeline.demo.synthetic import laion_table

    d = tmp_path / name
    d.mkdir(exist_ok=True)
    urls = [r[0] for r in rows]
    caps = [r[1] for r in rows]
    pq.write_table(
        laion_table(len(rows), schema=schema, urls=urls, captions=caps), d / "part-0.parquet"
    )
    return str(d)


@pytest.mark.parametrize("schema", ["laion2b", "relaion"])
def test_filter_end_to_end_known_answers(tmp_path, dataset_yaml, schema):
    meta = _write(tmp_path, "in", KNOWN, schema)
    out = str(tmp_path / "out")
    assert main(["filter", "--dataset", dataset_yaml, "--metadata", meta, "--out", out]) == 0
    table = ds.dataset(out).to_table().sort_by("url")
    got = {r["url"]: r for r in table.to_pylist()}
    want = {u: c for u, _, c in KNOWN if c}
    assert {u: r["class_name"] for u, r in got.items()} == want
    for u, r in got.items():
        assert r["uid"] == io.make_uid(u, r["caption"]) and r["label"] == CLASSES.index(
            r["class_name"]
        )
        assert {"width", "height", "similarity", "punsafe", "pwatermark"} <= set(r)
    assert got["http://a.test/9.jpg"]["matched_term"] == "goldie"
    stats = json.loads((tmp_path / "out" / "_stats.json").read_text())
    assert stats["rows_scanned"] == len(KNOWN) and stats["rows_matched"] == len(want)
    assert stats["dropped"]["ambiguous"] == 1 and stats["dropped"]["null_or_empty_caption"] == 2
    assert stats["per_class"]["rose"] == 1
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    # A rerun on complete output does nothing (files untouched) unless --overwrite.
    before = os.path.getmtime(os.path.join(out, "_stats.json"))
    assert main(["filter", "--dataset", dataset_yaml, "--metadata", meta, "--out", out]) == 0
    assert os.path.getmtime(os.path.join(out, "_stats.json")) == before


def test_keep_ambiguous_and_row_filters(tmp_path, dataset_yaml):
    meta = _write(tmp_path, "in", KNOWN)
    cfg = TextFilterConfig(keep_ambiguous=True)
    stats = run_text_filter(cfg, dataset_yaml, meta, str(tmp_path / "amb"))
    t = ds.dataset(str(tmp_path / "amb")).to_table()
    amb = t.filter(pa.compute.equal(t.column("url"), "http://a.test/5.jpg"))
    assert sorted(amb.column("class_name").to_pylist()) == ["rose", "tabby cat"]
    assert stats["rows_matched"] == 7
    stats = run_text_filter(
        TextFilterConfig(min_width=10**6), dataset_yaml, meta, str(tmp_path / "small")
    )
    assert stats["rows_matched"] == 0 and stats["dropped"]["too_small"] == 5


def test_cap_is_seeded_sample_and_dedup(tmp_path, dataset_yaml):
    rows = [(f"http://a.test/{i}.jpg", f"photo {i} of a tabby cat", "tabby cat") for i in range(40)]
    rows += [("http://a.test/0.jpg", "same url, another tabby cat caption", "tabby cat")]
    meta = _write(tmp_path, "in", rows)
    uids = lambda d: sorted(ds.dataset(d).to_table().column("uid").to_pylist())  # noqa: E731
    s1 = run_text_filter(
        TextFilterConfig(max_per_class=10, seed=1), dataset_yaml, meta, str(tmp_path / "a")
    )
    run_text_filter(
        TextFilterConfig(max_per_class=10, seed=1), dataset_yaml, meta, str(tmp_path / "b")
    )
    run_text_filter(
        TextFilterConfig(max_per_class=10, seed=2), dataset_yaml, meta, str(tmp_path / "c")
    )
    assert (
        s1["rows_matched"] == 10
        and s1["dropped"]["duplicate_url"] == 1
        and s1["dropped"]["over_class_cap"] == 30
    )
    assert uids(str(tmp_path / "a")) == uids(str(tmp_path / "b"))
    assert uids(str(tmp_path / "a")) != uids(str(tmp_path / "c"))
    # Not the first rows in file order.
    first = sorted(io.make_uid(u, c) for u, c, _ in rows[:10])
    assert uids(str(tmp_path / "a")) != first


def test_missing_column_fails_naming_file_and_column(tmp_path, dataset_yaml, caplog):
    d = tmp_path / "bad"
    d.mkdir()
    pq.write_table(
        pa.table({"URL": ["http://a.test/x.jpg"], "CAPTION_TEXT": ["tabby cat"]}), d / "p.parquet"
    )
    assert (
        main(
            [
                "filter",
                "--dataset",
                dataset_yaml,
                "--metadata",
                str(d),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "p.parquet" in caplog.text and "'caption'" in caption_text(caplog)
    # A column mapping fixes it.
    assert (
        main(
            [
                "filter",
                "--dataset",
                dataset_yaml,
                "--metadata",
                str(d),
                "--out",
                str(tmp_path / "o"),
                "--set",
                "filter.columns.caption=[CAPTION_TEXT]",
            ]
        )
        == 0
    )


def caption_text(caplog):
    return caplog.text


def test_corrupt_file_fails_or_is_skipped_and_rerun_resumes(tmp_path, dataset_yaml, caplog):
    meta = _write(tmp_path, "in", KNOWN)
    (tmp_path / "in" / "part-1.parquet").write_bytes(b"PAR1 this is not parquet")
    out = str(tmp_path / "out")
    assert main(["filter", "--dataset", dataset_yaml, "--metadata", meta, "--out", out]) == 2
    assert "part-1.parquet" in caplog.text
    assert not io.is_done(out)
    stats = run_text_filter(TextFilterConfig(skip_bad_files=True), dataset_yaml, meta, out)
    assert list(stats["bad_files"]) == [str(tmp_path / "in" / "part-1.parquet")]
    assert stats["rows_matched"] == 5 and io.is_done(out)
    # The same input minus the bad file, from scratch, gives the same rows.
    os.unlink(tmp_path / "in" / "part-1.parquet")
    run_text_filter(TextFilterConfig(), dataset_yaml, meta, str(tmp_path / "clean"))
    assert ds.dataset(out).to_table() == ds.dataset(str(tmp_path / "clean")).to_table()


def test_scan_parts_left_without_a_fingerprint_are_not_trusted(tmp_path, dataset_yaml):
    """A scan part with its marker but no record of the inputs it came from (here scanned with
    other settings) is rescanned, not reused; the output is a clean run's. (Reuse of a failed
    run's finished scans: test_a_run_failing_after_its_scan_resumes_from_the_finished_pieces.)"""
    from pipeline.demo.synthetic import laion_table

    d = _write(tmp_path, "in", KNOWN)  # one ambiguous caption: keep_ambiguous changes the part
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


def _three_files(tmp_path):
    from pipeline.demo.synthetic import laion_table

    d = tmp_path / "in"
    d.mkdir()
    for i in range(3):
        pq.write_table(laion_table(300, CLASSES, seed=i), d / f"p{i}.parquet")
    return list(enumerate(io.list_files(str(d), suffixes=(".parquet",))))


def test_a_task_publishes_each_file_while_it_scans_the_next(tmp_path, monkeypatch):
    """scan_files commits a file (fsync/rename or upload, then its marker) on a background
    thread: the first file's commit can wait for the second file's scan to start."""
    import threading

    files = _three_files(tmp_path)
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

    files = _three_files(tmp_path)
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

    files = _three_files(tmp_path)
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


def _garble_captions(path):
    """The file's caption pages garbled; its footer still reads."""
    meta = pq.read_metadata(path)
    cols = [meta.row_group(0).column(c) for c in range(meta.num_columns)]
    text = next(c for c in cols if c.path_in_schema == "TEXT")
    with open(path, "r+b") as f:
        f.seek(text.data_page_offset)
        f.write(b"\xff" * 256)


def test_a_scan_error_still_waits_for_the_earlier_files_commits(tmp_path, monkeypatch):
    import time as _time

    files = _three_files(tmp_path)
    _garble_captions(files[1][1])
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

    files = _three_files(tmp_path)
    _garble_captions(files[1][1])

    def failing_commit(self):
        _time.sleep(0.3)  # still running when the next file's scan fails
        raise OSError("disk full")

    monkeypatch.setattr(io.StagedFile, "commit", failing_commit)
    with pytest.raises(io.InputError, match="p1.parquet") as err:
        tfscan.scan_files(files, str(tmp_path / "out"), TextFilterConfig(), RULES)
    assert any("disk full" in n for n in getattr(err.value, "__notes__", []))
    assert "disk full" in caplog.text


def test_keys_are_read_in_part_order_and_a_truncated_file_is_refused(tmp_path):

    out = str(tmp_path / "out")
    files = _three_files(tmp_path)
    tfscan.scan_files(files, out, TextFilterConfig(), RULES)
    each = [
        np.frombuffer(io.read_bytes(tfparts._keys_path(out, i)), tfbatch.KEY_DTYPE) for i in (2, 0)
    ]
    keys, sizes = tfglobal._read_keys(out, [2, 0])
    assert sizes == [len(k) for k in each] and all(sizes)
    assert keys.tobytes() == b"".join(k.tobytes() for k in each)
    with open(tfparts._keys_path(out, 1), "ab") as f:
        f.write(b"x")  # not a whole number of records
    with pytest.raises(RuntimeError, match="part-00001.keys missing or truncated"):
        tfglobal._read_keys(out, [0, 1])
    assert tfglobal._read_keys(out, [])[1] == []
    with pytest.raises(RuntimeError, match="part-00000.keys missing or truncated"):
        tfglobal._read_keys(out, [0], [sizes[1] + 1])  # a whole record short of its stats' count
    assert tfglobal._read_keys(out, [2, 0], sizes)[1] == sizes


def test_input_and_output_on_s3(s3_bucket, dataset_yaml, tmp_path, monkeypatch):
    from pipeline.demo.synthetic import laion_table

    table = laion_table(
        len(KNOWN), schema="relaion", urls=[r[0] for r in KNOWN], captions=[r[1] for r in KNOWN]
    )
    io.write_parquet(table, io.join(s3_bucket, "laion", "part-0.parquet"))
    out = io.join(s3_bucket, "matches")
    stats = run_text_filter(TextFilterConfig(), dataset_yaml, io.join(s3_bucket, "laion"), out)
    assert stats["rows_matched"] == 5 and io.is_done(out)
    fs, path = io.url_to_fs(out)
    assert ds.dataset(path, filesystem=fs).to_table().num_rows == 5
    # A file of three row groups scanned in pieces through fsspec: the same rows.
    with fs.open(io.url_to_fs(io.join(s3_bucket, "laion3", "part-0.parquet"))[1], "wb") as f:
        pq.write_table(table, f, row_group_size=3)
    out3 = io.join(s3_bucket, "matches3")
    cfg = TextFilterConfig(split_rows=5)  # 9 rows: 3 + 6
    stats = run_text_filter(cfg, dataset_yaml, io.join(s3_bucket, "laion3"), out3)
    assert stats["scan_units"] == 2 and stats["rows_matched"] == 5
    got = ds.dataset(io.url_to_fs(out3)[1], filesystem=fs).to_table()
    whole = ds.dataset(path, filesystem=fs).to_table()
    # The same rows of another input file: only source_file differs.
    assert set(got.column("source_file").to_pylist()) == {
        io.join(s3_bucket, "laion3", "part-0.parquet")
    }
    assert got.drop_columns(["source_file"]) == whole.drop_columns(["source_file"])
    # The global filters in URL buckets, the keys read from the store once per bucket.

    monkeypatch.setattr(tfglobal, "GLOBAL_BYTES_PER_MATCH", 1 << 20)
    out4 = io.join(s3_bucket, "matches4")
    cfg = TextFilterConfig(split_rows=5, global_memory_mb=1)
    stats = run_text_filter(cfg, dataset_yaml, io.join(s3_bucket, "laion3"), out4)
    assert stats["global_buckets"] == 8 and stats["rows_matched"] == 5
    assert ds.dataset(io.url_to_fs(out4)[1], filesystem=fs).to_table() == got


def test_hostile_captions_never_crash(tmp_path, dataset_yaml):
    rows = [
        ("http://a.test/1.jpg", "tabby cat " + "x" * 5_000_000, None),  # megabytes long
        ("http://a.test/2.jpg", "\u202egolden retriever\u202c", "golden retriever"),
        ("http://a.test/3.jpg", "tabby\u200bcat", None),
        ("http://a.test/4.jpg", "\x00\x01 rose \x7f", "rose"),
    ]
    d = tmp_path / "in"
    d.mkdir()
    # Invalid UTF-8 bytes in a binary caption column.
    t = pa.table(
        {
            "url": [r[0] for r in rows] + ["http://a.test/5.jpg"],
            "caption": pa.array(
                [r[1].encode() for r in rows] + [b"\xff\xfe tabby cat \xc3"], pa.binary()
            ),
        }
    )
    pq.write_table(t, d / "p.parquet")
    stats = run_text_filter(TextFilterConfig(), dataset_yaml, str(d), str(tmp_path / "out"))
    got = {
        r["url"]: r["class_name"] for r in ds.dataset(str(tmp_path / "out")).to_table().to_pylist()
    }
    assert got == {
        "http://a.test/2.jpg": "golden retriever",
        "http://a.test/4.jpg": "rose",
        "http://a.test/5.jpg": "tabby cat",
    }
    assert stats["dropped"]["caption_too_long"] == 1


def test_spark_submit_job(tmp_path, dataset_yaml):
    """jobs/text_filter.py under the spark-submit that pyspark ships, --master local[2]."""
    import pyspark

    meta = _write(tmp_path, "in", KNOWN)
    out = str(tmp_path / "out")
    submit = os.path.join(os.path.dirname(pyspark.__file__), "bin", "spark-submit")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    r = subprocess.run(
        [
            submit,
            "--master",
            "local[2]",
            "--conf",
            "spark.ui.enabled=false",
            os.path.join(repo, "jobs", "text_filter.py"),
            "--dataset",
            dataset_yaml,
            "--metadata",
            meta,
            "--out",
            out,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert io.is_done(out) and ds.dataset(out).to_table().num_rows == 5


def test_row_filters_in_the_pure_core():
    """filter_batch alone (no Spark): size, safety and similarity filters, counted by reason."""
    from collections import Counter

    from pipeline.text_filter.batch import filter_batch, resolve_columns
    from pipeline.text_filter.matcher import Matcher

    batch = pa.RecordBatch.from_pydict(
        {
            "URL": [f"http://a.test/{i}.jpg" for i in range(5)],
            "TEXT": ["a rose"] * 5,
            "WIDTH": [10, 500, 500, 500, None],
            "HEIGHT": [500, 500, 500, 500, 500],
            "punsafe": [0.0, 0.9, 0.0, 0.0, 0.0],
            "similarity": [0.3, 0.3, 0.1, 0.3, 0.3],
        }
    )
    cfg = TextFilterConfig(min_width=100, max_punsafe=0.5, min_similarity=0.2)
    cols = resolve_columns(batch.schema, cfg.columns, "mem")
    stats = Counter()
    out = filter_batch(batch, cols, Matcher(CLASSES), cfg, CLASSES, stats)
    assert out.column("url").to_pylist() == ["http://a.test/3.jpg"]
    assert (
        out.schema.field("label").type == pa.int32()
        and out.schema.field("width").type == pa.int64()
    )
    assert {k: stats[k] for k in ("dropped_too_small", "dropped_unsafe", "dropped_low_similarity", "rows_matched")} == {
        "dropped_too_small": 2, "dropped_unsafe": 1, "dropped_low_similarity": 1, "rows_matched": 1,
    }  # fmt: skip


def test_rerun_is_byte_identical_and_duplicate_files_count_once(tmp_path, dataset_yaml):
    from pipeline.demo.synthetic import laion_table

    d = tmp_path / "in"
    d.mkdir()
    t = laion_table(400, CLASSES, seed=3, match_rate=0.5)
    pq.write_table(t, d / "a.parquet")
    pq.write_table(t.slice(0, 100), d / "b.parquet")  # the same rows again in a second file
    out = str(tmp_path / "out")
    s1 = run_text_filter(TextFilterConfig(), dataset_yaml, str(d), out)
    first = {
        p: open(os.path.join(out, p), "rb").read()
        for p in sorted(os.listdir(out))
        if p.startswith("part-")
    }
    assert list(first) == ["part-00000.parquet", "part-00001.parquet"]
    assert s1["dropped"]["duplicate_row"] > 0
    uids = ds.dataset(out).to_table().column("uid").to_pylist()
    assert len(uids) == len(set(uids)) == s1["rows_matched"]
    assert (
        main(
            ["filter", "--dataset", dataset_yaml, "--metadata", str(d), "--out", out, "--overwrite"]
        )
        == 0
    )
    assert {p: open(os.path.join(out, p), "rb").read() for p in first} == first


def test_task_groups_pack_small_files_in_order_without_idling_cores():
    from pipeline.text_filter.plan import task_groups

    todo = [(i, f"f{i}") for i in range(6)]

    def grouped(sizes, task_rows, cores):
        got = task_groups(todo[: len(sizes)], dict(enumerate(sizes)), task_rows, cores)
        assert [t for g in got for t in g] == todo[: len(sizes)]  # all, once, in input order
        return [[i for i, _ in g] for g in got]

    assert grouped([500] * 4, 1000, 2) == [[0, 1], [2, 3]]
    assert grouped([500] * 4, 1000, 1) == [[0, 1], [2, 3]]  # task_rows bounds a group
    assert grouped([500] * 4, 10_000, 2) == [[0, 1], [2, 3]]  # an even share per core bounds it
    assert grouped([500] * 4, 1000, 64) == [[0], [1], [2], [3]]  # many cores: a task per file
    assert grouped([500] * 4, 0, 2) == [[0], [1], [2], [3]]  # 0: a task per file
    # A group never goes past the bound; a file above it is a task of its own.
    assert grouped([100, 5000, 100, 100, 900, 100], 1000, 1) == [[0], [1], [2, 3], [4, 5]]
    assert grouped([399, 399, 399, 3], 10**6, 3) == [[0], [1], [2], [3]]  # share 400 a core
    assert grouped([900, 900, 200], 10**6, 2) == [[0], [1], [2]]  # share 1000
    assert grouped([0, 0, 0], 1000, 2) == [[0, 1, 2]]  # empty files: one task
    assert grouped([700], 1000, 2) == [[0]]
    # Files a failed run scanned (left out of rows) cost nothing: they join any group, and the
    # share is of the rows still to scan.
    rows = {2: 500, 3: 500}
    assert [[i for i, _ in g] for g in task_groups(todo[:4], rows, 10**6, 2)] == [[0, 1, 2], [3]]


def test_grouped_tasks_write_the_same_bytes_as_a_task_per_file(tmp_path, dataset_yaml):
    from pipeline.demo.synthetic import laion_table

    d = tmp_path / "in"
    d.mkdir()
    for i in range(4):
        pq.write_table(laion_table(100, CLASSES, seed=10 + i, match_rate=0.5), d / f"p{i}.parquet")
    outs = {}
    for rows in (200, 0):
        out = str(tmp_path / f"out{rows}")
        stats = run_text_filter(TextFilterConfig(task_rows=rows), dataset_yaml, str(d), out)
        assert stats["scan_tasks"] == (2 if rows else 4)
        outs[rows] = {
            p: open(os.path.join(out, p), "rb").read()
            for p in sorted(os.listdir(out))
            if p.startswith("part-")
        }
    assert len(outs[0]) == 4 and outs[200] == outs[0]


def test_bad_config_is_a_clear_error(tmp_path, dataset_yaml, caplog):
    meta = _write(tmp_path, "in", KNOWN)
    argv = ["filter", "--dataset", dataset_yaml, "--metadata", meta, "--out", str(tmp_path / "o")]
    assert main([*argv, "--set", "filter.max_per_class=-1", "--set", "filter.nope=1"]) == 2
    assert "max_per_class" in caplog.text or "nope" in caplog.text
    assert not os.path.exists(tmp_path / "o" / "_SUCCESS")


def test_rerun_after_failure_with_other_settings_rescans(tmp_path, dataset_yaml):
    """Scan parts of a failed run are reused only for the same inputs and settings."""
    from pipeline.text_filter.scan import scan_file

    meta = _write(tmp_path, "in", KNOWN)
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


def _reference_keep(rows, cfg):
    """The global filters written plainly: rows are (uid, url, label, part)."""
    from collections import defaultdict

    from pipeline.text_filter.hashing import cap_hash

    best = {}
    for uid, url, label, part in rows:
        if (uid, label) not in best or part < best[uid, label][1]:
            best[uid, label] = (url, part)
    items = [(uid, label, part, url) for (uid, label), (url, part) in best.items()]
    counts = {"dropped_duplicate_row": len(rows) - len(items)}
    if cfg.dedup_urls and items:
        smallest = {}
        for uid, _, _, url in items:
            if url is not None:
                smallest[url] = min(smallest.get(url, uid), uid)
        kept = [it for it in items if it[3] is not None and smallest[it[3]] == it[0]]
        counts["dropped_duplicate_url"] = len(items) - len(kept)
        items = kept
    if cfg.max_per_class and items:
        uids = sorted({it[0] for it in items})
        h = dict(zip(uids, cap_hash(uids, cfg.seed).tolist()))
        by_class = defaultdict(list)
        for it in items:
            by_class[it[1]].append(it)
        kept = [
            it
            for group in by_class.values()
            for it in sorted(group, key=lambda it: (h[it[0]], it[0]))[: cfg.max_per_class]
        ]
        counts["dropped_over_class_cap"] = len(items) - len(kept)
        items = kept
    return sorted((uid, label, part) for uid, label, part, _ in items), counts


@pytest.mark.parametrize("kernel", [True, False], ids=["numba", "numpy"])
def test_global_filters_against_brute_force(kernel, monkeypatch):
    """global_keep (a sort over uid and URL digests, then one compiled pass, or numpy where
    numba is missing) equals the rules written plainly, on random keys with rows repeated
    across parts, shared and missing URLs, and caps."""
    import random
    import sys

    if not kernel:
        monkeypatch.setitem(sys.modules, "pipeline.text_filter.kernels", None)  # import fails

    import numpy as np

    from pipeline.text_filter.batch import match_keys
    from pipeline.text_filter.global_filters import global_keep, global_keep_keys

    rng = random.Random(7)
    for _ in range(80):
        # Some uids share their high word (the sort's first key): the low word must decide.
        high = [rng.getrandbits(64) for _ in range(3)]
        uids = [
            f"{(rng.choice(high) if rng.random() < 0.3 else rng.getrandbits(64)) << 64 | rng.getrandbits(64):032x}"
            for _ in range(rng.randint(1, 40))
        ]
        urls = [f"http://a.test/{i}.jpg" for i in range(rng.randint(1, 15))] + [None]
        url_of = {u: rng.choice(urls) for u in uids}
        picks = [rng.choice(uids) for _ in range(rng.randint(0, 120))]
        rows = [(u, url_of[u], rng.randint(0, 3), rng.randint(0, 2)) for u in picks]
        cfg = TextFilterConfig(
            dedup_urls=rng.random() < 0.7,
            max_per_class=rng.choice([0, 1, 3]),
            seed=rng.randint(0, 9),
        )
        keys = pa.table(
            {
                "uid": pa.array([r[0] for r in rows], pa.string()),
                "url": pa.array([r[1] for r in rows], pa.string()),
                "label": pa.array([r[2] for r in rows], pa.int32()),
                "part": pa.array([r[3] for r in rows], pa.int64()),
            }
        )
        kept, counts = global_keep(keys, cfg)
        got = sorted(zip(*(kept.column(c).to_pylist() for c in ("uid", "label", "part"))))
        want, want_counts = _reference_keep(rows, cfg)
        assert got == want
        assert {k: v for k, v in counts.items() if v} == {k: v for k, v in want_counts.items() if v}
        # The driver reads the kept indices as row numbers per part: they come back ascending.
        idx, _ = global_keep_keys(match_keys(keys), keys.column("part").to_numpy(), cfg)
        assert (np.diff(idx) > 0).all()


@pytest.mark.parametrize("kernel", [True, False], ids=["numba", "numpy"])
def test_url_run_starting_with_a_repeated_row(kernel, monkeypatch):
    """A uid found under two URLs (hostile fields: the uid joins URL and caption with 0x1F, so
    url "a\x1fb" + caption "c" and url "a" + caption "b\x1fc" share it; scans now drop URLs
    with control characters, but the pass must not rely on it): where the repeat of a
    (uid, label) starts a URL run, that run still belongs to its first uid, in the compiled
    pass as in numpy."""
    import sys

    import numpy as np

    from pipeline.text_filter.batch import KEY_DTYPE
    from pipeline.text_filter.global_filters import global_keep_keys

    if not kernel:
        monkeypatch.setitem(sys.modules, "pipeline.text_filter.kernels", None)  # import fails
    rows = [(1, 3, 0), (1, 5, 0), (2, 5, 0), (2, 5, 1)]  # (url, uid, label)
    keys = np.zeros(len(rows), dtype=KEY_DTYPE)
    keys["url_hi"], keys["uid_lo"], keys["label"] = (np.array(c) for c in zip(*rows))
    keys["has_url"] = 1
    idx, counts = global_keep_keys(keys, np.array([0, 0, 1, 1]), TextFilterConfig())
    # (5, 0) is a repeat (kept in part 0, where URL 1's smallest uid 3 drops it); URL 2's run
    # belongs to uid 5, so (5, 1) stays.
    assert idx.tolist() == [0, 3]
    assert counts["dropped_duplicate_row"] == 1 and counts["dropped_duplicate_url"] == 1


def test_sort_keys_equals_lexsort():
    """_sort_keys (a value sort of the first key's high bits, ties fixed by the whole keys)
    gives np.lexsort's order: random hashes, keys differing only in their low bits (ties of
    the packed sort), exact repeats (by row number), three keys and six, empty and single
    rows."""
    import numpy as np

    from pipeline.text_filter.global_filters import _sort_keys

    rng = np.random.default_rng(11)
    u64 = np.uint64
    for n in (0, 1, 2, 7, 300, 5000):
        firsts = [
            rng.integers(0, 2**64 - 1, n, dtype=u64, endpoint=True),
            (rng.integers(0, 5, n, dtype=u64) << u64(40)) | rng.integers(0, 4, n, dtype=u64),
            rng.integers(0, 3, n, dtype=u64),
        ]
        for first in firsts:
            # Two more keys, or five (as URL de-duplication sorts: rows equal in the first three
            # are sorted by the rest apart), with few values each: ties in every key.
            for more in (2, 5):
                rest = tuple(
                    rng.integers(0, 3, n, dtype=u64) if k % 2 else rng.integers(0, 2, n)
                    for k in range(more)
                )
                got = _sort_keys(first, *rest)
                assert got.tolist() == np.lexsort((*reversed(rest), first)).tolist()


def test_uids_equal_the_io_definition():
    from pipeline.text_filter.hashing import make_uids

    urls = ["http://a.test/1.jpg", None, "http://é.test/2.jpg", "", "u\x1f"]
    caps = ["a cat", "x", None, "日本", ""]
    got = make_uids(pa.array(urls, pa.string()), pa.array(caps, pa.string())).to_pylist()
    assert got == [io.make_uid(u, c) for u, c in zip(urls, caps)]


@pytest.mark.parametrize("kernel", [True, False], ids=["numba", "hashlib"])
def test_blake2b_kernel_equals_hashlib_on_every_block_boundary(kernel, monkeypatch):
    """The compiled BLAKE2b-128 (uids) gives hashlib's bytes: empty rows, every
    length around the 128-byte block, random binary (not UTF-8), nulls, slices, large types;
    and so does the hashlib fallback used where numba is missing."""
    import hashlib
    import sys

    import numpy as np

    from pipeline.text_filter.hashing import blake2b_128

    if not kernel:
        monkeypatch.setitem(sys.modules, "pipeline.text_filter.kernels", None)  # import fails
    rng = np.random.default_rng(3)
    lengths = [0, 1, 7, 8, 9, 63, 64, 127, 128, 129, 255, 256, 257, 383, 384, 385, 1000]
    rows = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in lengths]
    rows += [
        rng.integers(0, 256, rng.integers(0, 700), dtype=np.uint8).tobytes() for _ in range(300)
    ]
    want = [hashlib.blake2b(r, digest_size=16).digest() for r in rows]
    arr = pa.array(rows, pa.binary())
    assert [bytes(d) for d in blake2b_128(arr)] == want
    assert [bytes(d) for d in blake2b_128(arr.slice(5, 50))] == want[5:55]
    assert [bytes(d) for d in blake2b_128(arr.cast(pa.large_binary()))] == want
    assert [bytes(d) for d in blake2b_128(pa.chunked_array([arr[:3], arr[3:9]]))] == want[:9]
    nulls = blake2b_128(pa.array(["ab", None, ""], pa.string()))
    assert [bytes(d) for d in nulls] == [
        hashlib.blake2b(b, digest_size=16).digest() for b in (b"ab", b"", b"")
    ]
    assert blake2b_128(pa.array([], pa.binary())).shape == (0, 16)


@pytest.mark.parametrize("kernel", [True, False], ids=["numba", "numpy"])
def test_murmur3_equals_mmh3_on_every_tail_length(kernel, monkeypatch):
    """The URL keys' MurmurHash3_x64_128 gives the mmh3 package's words: every tail length
    (0-15 bytes after the 16-byte blocks) for several block counts, random binary, nulls as
    empty, slices, large types; the numpy fallback where numba is missing gives the same."""
    import sys

    import numpy as np

    mmh3 = pytest.importorskip("mmh3")
    from pipeline.text_filter.hashing import murmur3_128

    if not kernel:
        monkeypatch.setitem(sys.modules, "pipeline.text_filter.kernels", None)  # import fails
    rng = np.random.default_rng(5)
    lengths = list(range(0, 50)) + [255, 256, 257, 1000, 4099]
    rows = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in lengths]
    rows += [
        rng.integers(0, 256, rng.integers(0, 300), dtype=np.uint8).tobytes() for _ in range(200)
    ]
    want = [mmh3.hash128(r, seed=0, x64arch=True, signed=False) for r in rows]

    def words(a):
        return [(h2 << 64) | h1 for h1, h2 in murmur3_128(a).tolist()]

    arr = pa.array(rows, pa.binary())
    assert words(arr) == want
    assert words(arr.slice(7, 60)) == want[7:67]
    assert words(arr.cast(pa.large_binary())) == want
    assert words(pa.chunked_array([arr[:3], arr[3:9]])) == want[:9]
    assert words(pa.array(["http://a.test/é.jpg", None], pa.string())) == [
        mmh3.hash128("http://a.test/é.jpg".encode(), seed=0, x64arch=True, signed=False),
        0,  # null hashes as empty: MurmurHash3 of no bytes, seed 0, is 0
    ]
    assert murmur3_128(pa.array([], pa.binary())).shape == (0, 2)


def test_filter_core_runs_without_numba():
    """numba missing (a node without it): the matcher falls back to a byte engine and uids to
    hashlib, with the same rows out."""
    code = """
import sys
sys.modules["numba"] = None  # any import of numba fails
from collections import Counter
import pyarrow as pa
from pipeline.core import io
from pipeline.text_filter.matcher import Matcher
from pipeline.text_filter.batch import filter_batch, resolve_columns
from pipeline.text_filter.config import TextFilterConfig
classes = ["tabby cat", "rose"]
batch = pa.record_batch({"URL": ["http://a.test/1.jpg", "http://a.test/2.jpg", "http://a.test/3.jpg"],
                         "TEXT": ["a tabby cat", "no match", "Roses, red"]})
cfg = TextFilterConfig()
m = Matcher(classes)
out = filter_batch(batch, resolve_columns(batch.schema, cfg.columns, "x"), m, cfg, classes, Counter())
assert m.engine != "tokens", m.engine
assert out.column("label").to_pylist() == [0, 1]
assert out.column("uid").to_pylist() == [io.make_uid("http://a.test/1.jpg", "a tabby cat"),
                                         io.make_uid("http://a.test/3.jpg", "Roses, red")]
print("ok", m.engine)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok ")


def test_uid_words_are_the_uids_value_and_refuse_anything_else():
    from pipeline.text_filter.hashing import _uid_words, make_uids

    uids = make_uids(pa.array([f"http://a.test/{i}.jpg" for i in range(50)]), pa.array(["c"] * 50))
    hi, lo = _uid_words(uids.slice(7, 20))
    assert [(h << 64) | lw for h, lw in zip(hi.tolist(), lo.tolist())] == [
        int(u, 16) for u in uids.to_pylist()[7:27]
    ]
    for bad in (["A" * 32], ["g" * 32], ["0" * 31], [None]):
        with pytest.raises(ValueError):
            _uid_words(pa.array(bad, pa.string()))


def test_a_spark_worker_freezes_its_heap_once_and_the_driver_never(tmp_path, spark):
    """PySpark's daemon runs gc.collect() after every task in a reused worker; once a worker
    has scanned, its loaded objects are frozen, so that collection walks only what later
    tasks leave. scan_files outside a Spark task (driver, tests) freezes nothing."""
    import gc

    files = _three_files(tmp_path)
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


def test_split_row_groups_cuts_at_the_boundaries_nearest_even_shares():
    from pipeline.text_filter.plan import plan_units, split_row_groups

    assert split_row_groups([100] * 6, 0) == [None]  # 0: never split
    assert split_row_groups([100] * 6, 600) == [None]  # within split_rows: the whole file
    assert split_row_groups([5000], 100) == [None]  # one row group is never cut
    assert split_row_groups([], 100) == [None]
    assert split_row_groups([100] * 6, 599) == [(0, 3), (3, 6)]  # 2 pieces, 300 each
    assert split_row_groups([100] * 6, 250) == [
        (0, 2),
        (2, 4),
        (4, 6),
    ]  # 3 pieces of 200
    assert split_row_groups([100] * 7, 300) == [(0, 2), (2, 5), (5, 7)]  # 200/300/200
    # A large row group is a piece of its own; the pieces cover every row group once, in order.
    assert split_row_groups([10, 10, 1000, 10, 10], 300) == [(0, 2), (2, 3), (3, 5)]
    for sizes, limit in (([7, 3, 9, 1, 4, 4, 8], 10), ([1] * 50, 7), ([50, 1, 1, 1, 50], 20)):
        pieces = split_row_groups(sizes, limit)
        assert [a for a, _ in pieces] == [0] + [b for _, b in pieces[:-1]]
        assert pieces[-1][1] == len(sizes) and all(a < b for a, b in pieces)
    sizes = {"a": [100] * 6, "b": [40], "c": [300, 300]}  # "x": unreadable, no footer
    units, rows = plan_units(["a", "x", "b", "c"], sizes, 250)
    assert [tuple(u) for u in units] == [
        (0, "a", (0, 2)), (1, "a", (2, 4)), (2, "a", (4, 6)), (4, "b", None),
        (5, "c", (0, 1)), (6, "c", (1, 2)),
    ]  # fmt: skip
    assert rows == {0: 200, 1: 200, 2: 200, 4: 40, 5: 300, 6: 300}
    # Nothing split: a unit's index is its file's.
    units, _ = plan_units(["a", "x", "b"], sizes, 0)
    assert [tuple(u) for u in units] == [(0, "a", None), (2, "b", None)]


def _split_input(tmp_path):
    """A 1200-row file of six 200-row row groups (with a row repeated across its first and last
    row group, and a URL shared by two captions across them) and a small second file."""
    from pipeline.demo.synthetic import laion_table

    d = tmp_path / "in"
    d.mkdir()
    big = laion_table(1200, CLASSES, seed=21, match_rate=0.5)
    caps, urls = big.column("TEXT").to_pylist(), big.column("URL").to_pylist()
    caps[5] = "my golden retriever"
    caps[1100], urls[1100] = caps[5], urls[5]  # the same row in piece 0 and piece 2
    caps[1101], urls[1101] = "another tabby cat", urls[7]  # the same URL, another row
    caps[7] = "a tabby cat"
    big = laion_table(1200, CLASSES, seed=21, urls=urls, captions=caps)
    pq.write_table(big, d / "a.parquet", row_group_size=200)
    pq.write_table(laion_table(150, CLASSES, seed=22, match_rate=0.5), d / "b.parquet")
    return str(d)


def _parts(out):
    return {
        p: open(os.path.join(out, p), "rb").read()
        for p in sorted(os.listdir(out))
        if p.startswith("part-")
    }


@pytest.mark.parametrize(
    "cfg",
    [TextFilterConfig(), TextFilterConfig(dedup_urls=False), TextFilterConfig(max_per_class=40)],
    ids=["dedup", "no-dedup", "cap"],
)
def test_a_large_file_scanned_in_row_group_pieces_gives_the_same_subset(
    tmp_path, dataset_yaml, cfg
):
    import dataclasses

    meta = _split_input(tmp_path)
    runs = {}
    for split in (0, 500):
        out = str(tmp_path / f"out{split}")
        c = dataclasses.replace(cfg, split_rows=split, task_rows=0)
        runs[split] = (run_text_filter(c, dataset_yaml, meta, out), out)
    (whole, w_out), (split, s_out) = runs[0], runs[500]
    assert (whole["scan_units"], whole["scan_tasks"]) == (2, 2)
    assert (split["scan_units"], split["scan_tasks"]) == (4, 4)  # a.parquet in 3 pieces
    assert len(_parts(s_out)) == 4
    # (rows_matched_before_global_filters may differ: a row repeated within one unit is dropped
    # by its scan, across units by the global pass; the totals agree.)
    for k in ("rows_scanned", "rows_matched", "dropped", "per_class"):
        assert split[k] == whole[k], k
    assert split["rows_scanned"] == 1350 and whole["dropped"]["duplicate_row"] >= 1
    if cfg.dedup_urls:
        assert whole["dropped"]["duplicate_url"] >= 1
    # The same rows in the same order (pieces follow the file's row order).
    assert ds.dataset(s_out).to_table() == ds.dataset(w_out).to_table()


def test_a_bad_row_group_fails_its_file_or_leaves_the_whole_file_out(
    tmp_path, dataset_yaml, caplog
):
    meta = _split_input(tmp_path)
    bad = os.path.join(meta, "a.parquet")
    # Garble the captions of row group 3 only: the footer and the other row groups still read.
    text = next(
        c for c in (pq.read_metadata(bad).row_group(3).column(i) for i in range(10))
        if c.path_in_schema == "TEXT"
    )  # fmt: skip
    with open(bad, "r+b") as f:
        f.seek(text.data_page_offset)
        f.write(b"\xff" * 256)
    argv = [
        "filter",
        "--dataset",
        dataset_yaml,
        "--metadata",
        meta,
        "--set",
        "filter.split_rows=500",
    ]
    assert main([*argv, "--out", str(tmp_path / "fail")]) == 2
    assert "a.parquet (row groups 2-3)" in caplog.text  # the file and the piece named
    assert not io.is_done(str(tmp_path / "fail"))
    out = str(tmp_path / "skip")
    stats = run_text_filter(
        TextFilterConfig(split_rows=500, skip_bad_files=True), dataset_yaml, meta, out
    )
    assert list(stats["bad_files"]) == [bad]
    # None of a.parquet's pieces, the readable ones included, reach the output or the counts.
    assert stats["rows_scanned"] == 150 and stats["scan_units"] == 4
    os.unlink(bad)
    clean = str(tmp_path / "clean")
    run_text_filter(TextFilterConfig(), dataset_yaml, meta, clean)
    assert ds.dataset(out).to_table() == ds.dataset(clean).to_table()


def test_a_run_failing_after_its_scan_resumes_from_the_finished_pieces(
    tmp_path, dataset_yaml, monkeypatch
):
    """The scan of a split file finished, the job failed before _SUCCESS (in the driver's
    global pass), and one piece's marker is gone as if its task had died: the rerun scans that
    piece alone and writes what a clean run writes."""

    meta = _split_input(tmp_path)
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
    assert _parts(out) == _parts(clean)


def test_a_driver_out_of_memory_reruns_in_buckets_on_the_same_scans(
    tmp_path, dataset_yaml, monkeypatch
):
    """The driver ran out of memory in its global pass after the scan: the rerun with a smaller
    global_memory_mb (in buckets) reuses every scan part and writes what a clean run writes."""

    meta = _split_input(tmp_path)
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
    assert _parts(out) == _parts(clean)


def test_job_progress_counts_the_tasks_of_its_own_jobs(spark):
    """The scan's bar moves as tasks finish, counts only the jobs started inside its block, and
    leaves later jobs out of its job group."""
    import time as _time

    from pipeline.core.spark import JobProgress

    class Bar:
        def __init__(self):
            self.n, self.steps, self.closed = 0, [], False

        def update(self, k):
            self.n += k
            self.steps.append(k)

        def close(self):
            self.closed = True

    sc = spark.sparkContext
    sc.parallelize(range(4), 4).count()  # before the block: not counted
    bar = Bar()
    with JobProgress(sc, "scan", 6, interval=0.05, bar=bar) as p:
        sc.parallelize(range(6), 6).map(lambda x: _time.sleep(0.3) or x).collect()
    assert bar.n == 6 and bar.closed
    assert len(bar.steps) > 1  # seen part way (three waves of two tasks), not only at the end
    assert sc.getLocalProperty("spark.jobGroup.id") is None
    sc.parallelize(range(3), 3).count()  # after the block: not in the group
    assert p.tasks_done() == 6


def test_filter_shows_the_scan_progress(tmp_path, dataset_yaml, monkeypatch):
    import io as _io

    import tqdm

    bars = []

    class Shown(tqdm.tqdm):  # as on a terminal, into a buffer
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "disable": False, "file": _io.StringIO()})
            bars.append(self)

    monkeypatch.setattr(tqdm, "tqdm", Shown)
    monkeypatch.setenv("PRIMER_PROGRESS", "bar")  # as on a terminal
    files = _three_files(tmp_path)
    run_text_filter(
        TextFilterConfig(task_rows=0),
        dataset_yaml,
        os.path.dirname(files[0][1]),
        str(tmp_path / "o"),
    )
    scan = [b for b in bars if b.desc == "scan"]
    assert len(scan) == 1 and scan[0].n == scan[0].total == 3  # a task per file


def test_filter_logs_its_progress_off_a_terminal(tmp_path, dataset_yaml, monkeypatch, caplog):
    """Under spark-submit, nohup or in a pod, a long scan logs done/total, rate and ETA."""
    import logging

    monkeypatch.setenv("PRIMER_PROGRESS", "log")
    monkeypatch.setenv("PRIMER_PROGRESS_INTERVAL", "0")
    files = _three_files(tmp_path)
    with caplog.at_level(logging.INFO, logger="primer.progress"):
        run_text_filter(
            TextFilterConfig(task_rows=0),
            dataset_yaml,
            os.path.dirname(files[0][1]),
            str(tmp_path / "o"),
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "primer.progress"]
    assert any(ln.startswith("scan: 3/3 task (") and "task/s" in ln for ln in lines), lines
    assert any(ln.startswith("check footers: 3/3") for ln in lines)


def test_global_buckets_fit_the_memory_budget():
    from pipeline.text_filter.global_filters import GLOBAL_BYTES_PER_MATCH, global_buckets

    mb = 1 << 20
    assert global_buckets(10**9, 0) == 1  # no limit
    assert global_buckets(0, 1) == 1
    assert global_buckets(mb // GLOBAL_BYTES_PER_MATCH, 1) == 1  # fits at once
    assert global_buckets(mb // GLOBAL_BYTES_PER_MATCH + 1, 1) == 2
    assert global_buckets(5 * mb // GLOBAL_BYTES_PER_MATCH, 1) == 8  # a power of two
    # 300M matches in the default 4 GB: 16 buckets of some 2.5 GB each.
    assert global_buckets(300_000_000, TextFilterConfig().global_memory_mb) == 16
    with pytest.raises(ValueError, match="global_memory_mb"):
        TextFilterConfig(global_memory_mb=-1)


@pytest.mark.parametrize(
    "cfg",
    [
        TextFilterConfig(),
        TextFilterConfig(dedup_urls=False),
        TextFilterConfig(max_per_class=300, seed=3),
        TextFilterConfig(dedup_urls=False, max_per_class=1000),
    ],
    ids=["dedup", "no-dedup", "cap", "no-dedup-cap"],
)
def test_global_filters_in_url_buckets_equal_one_pass_in_a_fraction_of_the_memory(tmp_path, cfg):
    """200k matches in five parts under a 1 MB budget: 32 URL buckets, the same kept rows,
    counts and per-class totals as one pass over all, at a fraction of its peak memory."""
    import dataclasses
    import tracemalloc

    from pipeline.demo.synthetic import scan_keys, write_scan_keys
    from pipeline.text_filter.global_filters import global_pass

    out = str(tmp_path / "out")
    done, matched = write_scan_keys(out, scan_keys(200_000, 5, seed=1))
    results = {}
    for mb in (0, 1):
        c = dataclasses.replace(cfg, global_memory_mb=mb)
        tracemalloc.start()
        results[mb] = global_pass(out, done, matched, c, 50)
        results[mb] += (tracemalloc.get_traced_memory()[1],)
        tracemalloc.stop()
    (kept1, counts1, per1, b1, peak1), (kept_b, counts_b, per_b, b, peak_b) = results.values()
    assert (b1, b) == (1, 32)
    assert (kept_b == kept1).all() and (per_b == per1).all()
    assert counts_b == counts1
    assert counts1["dropped_duplicate_row"] > 10_000
    if cfg.dedup_urls:
        assert counts1["dropped_duplicate_url"] > 10_000
    if cfg.max_per_class:
        assert counts1["dropped_over_class_cap"] > 0 and per1.max() == cfg.max_per_class
    assert peak_b < peak1 / 4, (peak_b, peak1)


def test_a_job_filtered_in_url_buckets_writes_what_one_pass_writes(
    tmp_path, dataset_yaml, monkeypatch
):
    """The whole job with the global filters forced into URL buckets (rows repeated across
    pieces, a URL shared across them, ambiguous rows kept, a cap): the same parts, byte for
    byte, and the same stats."""

    meta = _split_input(tmp_path)
    runs, base = {}, tfglobal.GLOBAL_BYTES_PER_MATCH
    for per_match in (base, 1 << 14):
        monkeypatch.setattr(tfglobal, "GLOBAL_BYTES_PER_MATCH", per_match)
        for name, cfg in {
            "dedup": TextFilterConfig(split_rows=500, global_memory_mb=1),
            "ambiguous-cap": TextFilterConfig(
                split_rows=500, global_memory_mb=1, keep_ambiguous=True, max_per_class=30
            ),
        }.items():
            out = str(tmp_path / f"{name}-{per_match}")
            runs[name, per_match] = (run_text_filter(cfg, dataset_yaml, meta, out), _parts(out))
    for name in ("dedup", "ambiguous-cap"):
        (one, one_parts), (many, many_parts) = (runs[name, p] for p in (base, 1 << 14))
        assert one["global_buckets"] == 1 and many["global_buckets"] >= 8
        assert many_parts == one_parts
        for k in ("rows_matched", "dropped", "per_class"):
            assert many[k] == one[k], k
        assert one["dropped"]["duplicate_row"] >= 1


def test_control_bytes_are_found_in_the_right_rows():
    from pipeline.text_filter.hashing import _has_control_bytes

    rows = [
        "http://a.test/é.jpg",
        None,
        "",
        "http://a.test/\x1f",
        "ok",
        "\x00",
        "tab\there",
        "日本",
    ]
    arr = pa.array(rows, pa.string())
    want = [False, False, False, True, False, True, True, False]
    assert _has_control_bytes(arr).tolist() == want
    assert _has_control_bytes(arr.slice(3, 4)).tolist() == want[3:7]  # an offset into buffers
    assert _has_control_bytes(pa.array([r.encode() if r else r for r in rows])).tolist() == want
    assert _has_control_bytes(pa.chunked_array([arr[:4], arr[4:]])).tolist() == want
    assert _has_control_bytes(pa.array(["clean"] * 3)).tolist() == [False] * 3
