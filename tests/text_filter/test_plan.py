"""The text filter's planning: files packed into scan tasks, large files cut into row-group
pieces, and pieces giving the same subset as whole files (a bad row group fails its file)."""

from __future__ import annotations

import os

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.app.cli import main
from pipeline.core import io
from pipeline.text_filter.config import TextFilterConfig
from pipeline.text_filter.stage import run_text_filter
from tests.text_filter.helpers import (
    part_bytes,
    split_input,
)

pytestmark = pytest.mark.usefixtures("spark")


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


@pytest.mark.parametrize(
    "cfg",
    [TextFilterConfig(), TextFilterConfig(dedup_urls=False), TextFilterConfig(max_per_class=40)],
    ids=["dedup", "no-dedup", "cap"],
)
def test_a_large_file_scanned_in_row_group_pieces_gives_the_same_subset(
    tmp_path, dataset_yaml, cfg
):
    import dataclasses

    meta = split_input(tmp_path)
    runs = {}
    for split in (0, 500):
        out = str(tmp_path / f"out{split}")
        c = dataclasses.replace(cfg, split_rows=split, task_rows=0)
        runs[split] = (run_text_filter(c, dataset_yaml, meta, out), out)
    (whole, w_out), (split, s_out) = runs[0], runs[500]
    assert (whole["scan_units"], whole["scan_tasks"]) == (2, 2)
    assert (split["scan_units"], split["scan_tasks"]) == (4, 4)  # a.parquet in 3 pieces
    assert len(part_bytes(s_out)) == 4
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
    meta = split_input(tmp_path)
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
