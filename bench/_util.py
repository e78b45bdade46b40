"""Helpers shared by the benchmarks: timing, a plain-text table, and recording a run.

``--record`` (see :func:`add_record_flag`) appends the run's rows as one dated JSON line to
``bench/results/<stage>.jsonl``; ``python bench/render.py`` rewrites the tables of
``docs/benchmarks.md`` from them (the latest run of each command).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "bench", "results")


@contextmanager
def timed(results: dict, name: str):
    t0 = time.perf_counter()
    yield
    results[name] = time.perf_counter() - t0


def table(rows: list[dict], columns: list[str]) -> str:
    """Right-aligned text table; floats get 3 significant decimals."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [
        "  ".join(c.rjust(w) for c, w in zip(columns, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def add_record_flag(parser) -> None:
    parser.add_argument(
        "--record",
        action="store_true",
        help="append this run's rows to bench/results/<stage>.jsonl (then: python bench/render.py)",
    )


def machine() -> str:
    """A short description of this machine: CPUs, memory, GPU if torch sees one."""
    cpus = os.cpu_count() or 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        desc = f"{cpus} vCPU, {mem:.0f} GiB, {platform.machine()}"
    except (ValueError, OSError, AttributeError):
        desc = f"{cpus} vCPU, {platform.machine()}"
    try:
        import torch

        if torch.cuda.is_available():
            desc += f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return desc


def record(stage: str, rows: list[dict], columns: list[str], args=None, note: str = "") -> None:
    """Append ``rows`` (the printed table) to ``bench/results/<stage>.jsonl`` when the run was
    started with ``--record``: date, machine, command, columns, rows, note."""
    if args is not None and not getattr(args, "record", False):
        return
    os.makedirs(RESULTS, exist_ok=True)
    entry = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": "python "
        + " ".join(
            [os.path.relpath(sys.argv[0], ROOT)] + [a for a in sys.argv[1:] if a != "--record"]
        ),
        "columns": columns,
        "rows": rows,
        "note": note,
    }
    with open(os.path.join(RESULTS, f"{stage}.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, default=str) + "\n")
    print(f"recorded in bench/results/{stage}.jsonl")
