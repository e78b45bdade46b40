"""Issue 3: the text-filter stage end to end on a real local[2] Spark session: known answers,
row filters, caps, bad inputs, S3, spark-submit, byte-identical reruns and progress."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.app.cli import main
from pipeline.core import io
from pipeline.text_filter import global_filters as tfglobal
from pipeline.text_filter.config import TextFilterConfig
from pipeline.text_filter.stage import run_text_filter
from tests.text_filter.helpers import (
    CLASSES,
    KNOWN,
    three_files,
    write_rows,
)

pytestmark = pytest.mark.usefixtures("spark")


@pytest.mark.parametrize("schema", ["laion2b", "relaion"])
def test_filter_end_to_end_known_answers(tmp_path, dataset_yaml, schema):
    meta = write_rows(tmp_path, "in", KNOWN, schema)
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
    meta = write_rows(tmp_path, "in", KNOWN)
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
    meta = write_rows(tmp_path, "in", rows)
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
    meta = write_rows(tmp_path, "in", KNOWN)
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

    meta = write_rows(tmp_path, "in", KNOWN)
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
    meta = write_rows(tmp_path, "in", KNOWN)
    argv = ["filter", "--dataset", dataset_yaml, "--metadata", meta, "--out", str(tmp_path / "o")]
    assert main([*argv, "--set", "filter.max_per_class=-1", "--set", "filter.nope=1"]) == 2
    assert "max_per_class" in caplog.text or "nope" in caplog.text
    assert not os.path.exists(tmp_path / "o" / "_SUCCESS")


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
    files = three_files(tmp_path)
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
    files = three_files(tmp_path)
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
