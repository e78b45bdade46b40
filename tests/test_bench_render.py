"""bench/render.py: docs/benchmarks.md's tables from bench/results/*.jsonl, and the page kept
current with the recorded runs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("render", os.path.join(_REPO, "bench", "render.py"))
render = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render)


def _entry(command, date, rows, columns=("hash", "seconds", "vs library"), note=""):
    return {
        "date": date, "machine": "2 vCPU, 15 GiB, x86_64", "command": command,
        "columns": list(columns), "rows": rows, "note": note,
    }  # fmt: skip


def _write(folder, stage, entries):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{stage}.jsonl"), "a", encoding="utf-8") as f:
        for e in entries:
            f.write(json.dumps(e) + "\n")


PAGE = """# Benchmarks

Prose before.

## Hashing

Why numba stays.

<!-- generated: hashing -->
stale table
<!-- generated: end -->

Prose after.

<!-- generated: nothing-yet -->
<!-- generated: end -->
"""


def test_latest_run_per_command_replaces_its_rows_in_place(tmp_path):
    res = tmp_path / "results"
    _write(res, "hashing", [
        _entry("python bench/hashing.py", "2026-01-01 10:00 UTC",
               [{"hash": "uid numba", "seconds": 0.07, "vs library": 4.5},
                {"hash": "uid hashlib", "seconds": 0.32, "vs library": 1.0}]),
        _entry("python bench/hashing.py --rows 1000", "2026-01-01 11:00 UTC",
               [{"hash": "uid numba", "seconds": 0.0004, "vs library": 3.25}], note="small"),
        _entry("python bench/hashing.py", "2026-01-02 09:30 UTC",
               [{"hash": "uid numba", "seconds": 0.0712, "vs library": 4.0},
                {"hash": "uid hashlib", "seconds": 0.285, "vs library": 1.0},
                {"hash": "url a|b", "seconds": 1234.5, "vs library": float("nan")}]),
    ])  # fmt: skip
    page = render.render(PAGE, render.load_results(str(res)))
    lines = page.splitlines()
    # Hand-written prose is kept, in place, around the generated block.
    assert lines[:6] == ["# Benchmarks", "", "Prose before.", "", "## Hashing", ""]
    assert "Why numba stays." in page and "stale table" not in page
    assert page.index("Prose after.") > page.index("<!-- generated: end -->")
    start = lines.index("<!-- generated: hashing -->")
    table = lines[start + 1 : lines.index("<!-- generated: end -->")]
    assert table == [
        "| run | hash | seconds | vs library |",
        "|---|---|---|---|",
        # The first command's latest run (the 2nd of Jan), rows where the 1st of Jan's stood.
        "| 1 | uid numba | 0.0712 | 4 |",
        "| 1 | uid hashlib | 0.285 | 1 |",
        "| 1 | url a\\|b | 1,234 | - |",
        "| 2 | uid numba | 0.0004 | 3.25 |",
        "",
        "1. `python bench/hashing.py`: 2026-01-02 09:30 UTC, 2 vCPU, 15 GiB, x86_64.",
        "2. `python bench/hashing.py --rows 1000`: 2026-01-01 11:00 UTC, 2 vCPU, 15 GiB, "
        "x86_64. small",
    ]
    # A block without results says so; rendering is idempotent.
    assert "<!-- generated: nothing-yet -->\n_No run recorded yet._\n" in page
    assert render.render(page, render.load_results(str(res))) == page


def test_a_stage_without_a_block_is_appended_and_columns_are_unioned(tmp_path):
    res = tmp_path / "results"
    _write(res, "knn", [
        _entry("python bench/selection.py --quick", "2026-01-03 08:00 UTC",
               [{"method": "faiss exact", "total_s": 1.5}], columns=["method", "total_s"]),
        _entry("python bench/selection.py --quick --clustered", "2026-01-03 08:05 UTC",
               [{"method": "faiss IVF", "total_s": 0.5, "recall@10": 0.989}],
               columns=["method", "total_s", "recall@10"]),
    ])  # fmt: skip
    page = render.render("# Benchmarks\n\nProse.\n", render.load_results(str(res)))
    assert page.startswith("# Benchmarks\n\nProse.\n\n## knn\n\n<!-- generated: knn -->\n")
    assert "| run | method | total_s | recall@10 |" in page
    assert "| 1 | faiss exact | 1.5 |  |" in page
    assert "| 2 | faiss IVF | 0.5 | 0.989 |" in page
    assert page.endswith("<!-- generated: end -->\n")
    assert render.render(page, render.load_results(str(res))) == page


def test_a_broken_line_is_named(tmp_path):
    res = tmp_path / "results"
    _write(res, "hashing", [_entry("python bench/hashing.py", "d", [])])
    with open(res / "hashing.jsonl", "a") as f:
        f.write('{"date": "d", "rows": []}\n')
    with pytest.raises(ValueError, match=r"hashing.jsonl:2: lacks machine, command, columns"):
        render.load_results(str(res))


def test_check_flag_fails_on_a_stale_page(tmp_path):
    res = tmp_path / "results"
    _write(res, "hashing", [_entry("python bench/hashing.py", "d", [{"hash": "x"}])])
    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE)
    cmd = [sys.executable, os.path.join(_REPO, "bench", "render.py"), "--results", str(res),
           "--page", str(page)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": _REPO}
    assert subprocess.run([*cmd, "--check"], env=env).returncode == 1
    assert subprocess.run(cmd, env=env).returncode == 0
    assert "| 1 | x |" in page.read_text()
    assert subprocess.run([*cmd, "--check"], env=env).returncode == 0


def test_docs_benchmarks_is_current_with_bench_results():
    """Fails when a run was recorded (bench/<stage>.py --record) without re-rendering the page:
    run python bench/render.py."""
    with open(render.PAGE, encoding="utf-8") as f:
        page = f.read()
    results = render.load_results(render.RESULTS)
    assert results, "bench/results holds no recorded run"
    assert render.render(page, results) == page, "run: python bench/render.py"
