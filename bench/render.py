"""Render the generated tables of docs/benchmarks.md from bench/results/*.jsonl.

Each line of ``bench/results/<stage>.jsonl`` is one run that ``bench/<script>.py --record``
appended (:func:`_util.record`): date, machine, command, columns, rows, note. A stage's table
holds, for each distinct command (a case: the script and its arguments), the rows of its latest
run, each row numbered after that run; the runs are listed under the table with their command,
date, machine and note, in the order their commands were first recorded, so a rerun replaces
its rows where they stood.

The page's hand-written prose is kept: a stage's table is written between
``<!-- generated: STAGE -->`` and ``<!-- generated: end -->``; a stage with results but no such
block gets one appended at the end of the page.

    python bench/render.py            # rewrite docs/benchmarks.md
    python bench/render.py --check    # exit 1 when the page is not current with bench/results
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
PAGE = os.path.join(ROOT, "docs", "benchmarks.md")
END = "<!-- generated: end -->"
BLOCK = re.compile(r"<!-- generated: (?!end -->)([\w.-]+) -->\n.*?" + re.escape(END), re.DOTALL)
REQUIRED = ("date", "machine", "command", "columns", "rows")


def load_results(results_dir: str = RESULTS) -> dict[str, list[dict]]:
    """Every stage's recorded runs, in the order they were appended."""
    out: dict[str, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.jsonl"))):
        stage = os.path.basename(path)[: -len(".jsonl")]
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e}); remove or fix the line") from e
                missing = [k for k in REQUIRED if k not in entry]
                if missing:
                    raise ValueError(
                        f"{path}:{n}: lacks {', '.join(missing)}; record runs with --record"
                    )
                out.setdefault(stage, []).append(entry)
    return out


def latest_runs(entries: list[dict]) -> list[dict]:
    """The latest run of each command, in the order the commands were first recorded."""
    latest: dict[str, dict] = {}
    for e in entries:
        latest[e["command"]] = e  # a later line replaces an earlier one; the key keeps its place
    return list(latest.values())


def cell(v) -> str:
    """A value as a table cell: thousands separated, three significant digits below 100."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        s = f"{v:.3g}"
        return f"{v:.2e}" if "e" in s else s
    return str(v).replace("|", "\\|").replace("\n", " ")


def stage_table(entries: list[dict]) -> str:
    """One stage's markdown: the table of the latest runs' rows, then the runs."""
    runs = latest_runs(entries)
    columns: list[str] = []
    for run in runs:
        columns += [c for c in run["columns"] if c not in columns]
    lines = [
        "| run | " + " | ".join(cell(c) for c in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for i, run in enumerate(runs, 1):
        for row in run["rows"]:
            lines.append(f"| {i} | " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    lines.append("")
    for i, run in enumerate(runs, 1):
        note = f" {cell(run['note'])}" if run.get("note") else ""
        lines.append(f"{i}. `{run['command']}`: {run['date']}, {run['machine']}.{note}")
    return "\n".join(lines)


def block(stage: str, entries: list[dict] | None) -> str:
    body = stage_table(entries) if entries else "_No run recorded yet._"
    return f"<!-- generated: {stage} -->\n{body}\n{END}"


def render(page: str, results: dict[str, list[dict]]) -> str:
    """``page`` with every generated block rewritten from ``results``; stages without a block
    get one at the end, under their own heading."""
    placed = set(BLOCK.findall(page))
    out = BLOCK.sub(lambda m: block(m.group(1), results.get(m.group(1))), page)
    for stage in sorted(set(results) - placed):
        out = out.rstrip("\n") + f"\n\n## {stage}\n\n{block(stage, results[stage])}\n"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the page is not current")
    ap.add_argument("--results", default=RESULTS, help="folder of <stage>.jsonl files")
    ap.add_argument("--page", default=PAGE, help="the markdown page to render into")
    args = ap.parse_args()
    with open(args.page, encoding="utf-8") as f:
        page = f.read()
    new = render(page, load_results(args.results))
    if args.check:
        if new != page:
            print(f"{args.page} is not current: run python bench/render.py", file=sys.stderr)
            return 1
        return 0
    if new != page:
        sys.path.insert(0, ROOT)
        from pipeline.core.io import write_bytes

        write_bytes(args.page, new.encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
