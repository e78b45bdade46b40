"""Planning the scan: every input file's footer checked (a missing column fails at once, naming
the file), files of more than ``split_rows`` rows cut into runs of whole row groups (scan
units), and consecutive small units grouped into Spark tasks. Only the footers decide the
units, so a rerun on another cluster finds the same ones and resumes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import io
from pipeline.text_filter.batch import resolve_columns
from pipeline.text_filter.config import TextFilterConfig


class ScanUnit(NamedTuple):
    """One piece of the scan: a whole input file, or a run of its row groups. ``index`` names
    its scan part and final part (``part-<index>``); units are numbered in input order."""

    index: int
    url: str
    row_groups: tuple[int, int] | None = None  # [lo, hi) of the file's row groups; None: all


def check_inputs(
    files: list[str], cfg: TextFilterConfig
) -> tuple[list[str], dict[str, str], dict[str, list[int]]]:
    """Read every file's footer; returns (readable files, bad files -> reason, readable files ->
    the row count of each of their row groups).

    A missing required column always raises; an unreadable footer raises unless
    ``skip_bad_files``. Footers are read by a thread pool (thousands of files on an object
    store are slow to read one at a time); errors are reported in file order, as one at a time.
    """
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.core.progress import progress

    def footer(f: str) -> tuple[pa.Schema, int] | Exception:
        try:
            fs, path = io.url_to_fs(f)
            with fs.open(path, "rb") as fh:
                meta = pq.read_metadata(fh)
            groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            return meta.schema.to_arrow_schema(), groups
        except Exception as e:
            return e

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(files)))) as pool:
        footers = list(progress(pool.map(footer, files), total=len(files), desc="check footers"))
    good, bad, rows = [], {}, {}
    for f, got in zip(files, footers):
        if isinstance(got, Exception):
            e = got
            if not cfg.skip_bad_files:
                raise io.InputError(
                    f"{f}: not a readable parquet file ({type(e).__name__}: {e})"
                ) from e
            bad[f] = f"{type(e).__name__}: {e}"
            continue
        resolve_columns(got[0], cfg.columns, f)
        good.append(f)
        rows[f] = got[1]
    return good, bad, rows


def split_row_groups(sizes: list[int], split_rows: int) -> list[tuple[int, int] | None]:
    """The row-group runs ``[lo, hi)`` a file of row groups of ``sizes`` rows is scanned in:
    ``[None]`` (the whole file) when it holds at most ``split_rows`` rows (or 0: never split),
    else ``k = ceil(rows / split_rows)`` runs cut at the row-group boundaries nearest to even
    shares, so the pieces are about equal. A row group is never cut, so a single large one is
    a piece of its own, and a file of one row group is never split.

    Only the footer decides it, never the cluster: a rerun on another number of cores finds
    the same pieces, and resumes.
    """
    total = sum(sizes)
    if split_rows <= 0 or total <= split_rows or len(sizes) <= 1:
        return [None]
    k = min(len(sizes), -(-total // split_rows))
    ends = np.cumsum(np.asarray(sizes, dtype=np.int64))[:-1]  # rows before boundary b + 1
    cuts: list[int] = []
    for j in range(1, k):
        b = int(np.argmin(np.abs(ends - j * total / k))) + 1
        if (not cuts or b > cuts[-1]) and b < len(sizes):
            cuts.append(b)
    bounds = [0, *cuts, len(sizes)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def plan_units(
    files: list[str], row_groups: dict[str, list[int]], split_rows: int
) -> tuple[list[ScanUnit], dict[int, int]]:
    """The scan units of ``files`` (in order; ``row_groups``: the row-group sizes of the
    readable ones, from :func:`check_inputs`), each file split by :func:`split_row_groups`; and
    each unit's rows. Indices run over the files in order, a piece taking one each and an
    unreadable file one it leaves unused, so where nothing is split a part's index is its
    input file's."""
    units: list[ScanUnit] = []
    rows: dict[int, int] = {}
    index = 0
    for f in files:
        if f not in row_groups:
            index += 1
            continue
        sizes = row_groups[f]
        for rg in split_row_groups(sizes, split_rows):
            rows[index] = sum(sizes) if rg is None else sum(sizes[rg[0] : rg[1]])
            units.append(ScanUnit(index, f, rg))
            index += 1
    return units, rows


def task_groups(
    todo: list[ScanUnit], rows: dict[int, int], task_rows: int, parallelism: int
) -> list[list[ScanUnit]]:
    """The scan's Spark tasks: consecutive scan units (in input order) grouped while a group
    stays within ``task_rows`` rows, by their footers' counts (``rows``: unit index -> rows, of
    the units still to scan; a unit missing from it counts as none, as an already scanned one
    costs nothing).

    Spark leaves a gap between one task and the next on a worker (longer before
    :func:`_freeze_worker_heap`, far longer where a task lands on a cold worker), so a task per
    small file wastes a share of the time. No group holds more than an even share of
    the rows per core (``parallelism``) either, so grouping does not leave cores idle (Spark
    packs small files into partitions by the same rule); only a single unit larger than that
    (at most ``split_rows``, or a file of one large row group) makes a bigger task. Each unit
    keeps its own scan part and resume marker either way. ``task_rows`` 0: a task per unit.
    """
    if task_rows <= 0 or len(todo) <= 1:
        return [[t] for t in todo]
    share = -(-sum(rows.get(u[0], 0) for u in todo) // max(1, parallelism))
    target = max(1, min(task_rows, share))
    groups: list[list[ScanUnit]] = []
    size = 0
    for item in todo:
        r = rows.get(item[0], 0)
        if not groups or (size > 0 and size + r > target):
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += r
    return groups
