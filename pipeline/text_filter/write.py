"""The output: a scan part that the global filters leave whole is hard-linked (or copied) into
place as ``part-<index>.parquet``; the others are rewritten by Spark tasks from the row numbers
the driver kept (``_scan/keep-<index>.rows``). Either way the same input and config give the
same files, byte for byte.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa

from pipeline.core import io
from pipeline.text_filter.parts import (
    _keep_path,
    _piece_paths,
)
from pipeline.text_filter.scan import _write_part


def finalize_part(index: int, out: str) -> int:
    """Write ``part-<index>.parquet``: the rows of scan part ``index`` that its keep file lists
    (ascending row numbers, int64), in file order. Returns the rows written."""
    part, _ = _piece_paths(out, index)
    rows = np.frombuffer(io.read_bytes(_keep_path(out, index)), dtype="<i8")
    table = io.read_parquet(part).take(pa.array(rows.astype(np.int64)))
    with io.atomic_open(io.join(out, f"part-{index:05d}.parquet")) as f:
        _write_part(table, f)
    return table.num_rows


def _publish_part(index: int, out: str) -> None:
    """Make scan part ``index`` the final ``part-<index>.parquet`` as it is (the global filters
    dropped none of its rows): a hard link where the output is local, else a copy; either
    appears whole or not at all."""
    src, _ = _piece_paths(out, index)
    dst = io.join(out, f"part-{index:05d}.parquet")
    fs, src_path = io.url_to_fs(src)
    _, dst_path = io.url_to_fs(dst)
    if not io.is_local(out):
        fs.copy(src_path, dst_path)  # object stores: a server-side copy, visible when done
        return
    tmp = os.path.join(os.path.dirname(dst_path), f".{os.path.basename(dst_path)}.tmp-link")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        os.link(src_path, tmp)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(src_path, tmp)
    os.replace(tmp, dst_path)
