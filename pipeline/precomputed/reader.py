"""Reading rows of ``.npy`` embedding files without reading the files.

The header is parsed from the file's first bytes (numpy's own header parser over them), so the
byte offset of row ``r`` is ``offset + r * dim * itemsize``. Locally the file is memory-mapped
and rows are indexed (only their pages are read); elsewhere (object stores, any fsspec URL)
rows less than ``gap_bytes`` apart are merged into runs and each run is one ranged read,
issued together through fsspec's ``cat_ranges`` (concurrent on s3fs).
"""

from __future__ import annotations

import io as _io
from dataclasses import dataclass

import numpy as np

from pipeline.core import io

# Bytes fetched for a header; a longer one (a very long shape tuple) is fetched again whole.
HEAD_BYTES = 4096


@dataclass(frozen=True)
class NpyHeader:
    """What a ``.npy`` header says: ``rows`` x ``dim`` of ``dtype``, row 0 at byte ``offset``."""

    rows: int
    dim: int
    dtype: str
    offset: int

    @property
    def row_bytes(self) -> int:
        return self.dim * np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        """The file's expected size."""
        return self.offset + self.rows * self.row_bytes


def parse_npy_header(head: bytes, where: str) -> NpyHeader | int:
    """The header of a ``.npy`` file from its first bytes, or the number of bytes needed when
    ``head`` is too short to hold it.

    Raises :class:`pipeline.core.io.InputError` naming ``where`` for a file that is not
    ``.npy``, not 2-D, Fortran-ordered (rows not contiguous) or not floating point.
    """
    fmt = np.lib.format
    if len(head) < 12 or not head.startswith(b"\x93NUMPY"):
        raise io.InputError(f"{where}: not a .npy file (no NUMPY magic)")
    major = head[6]
    if major == 1:
        start, hlen = 10, int.from_bytes(head[8:10], "little")
    elif major in (2, 3):
        start, hlen = 12, int.from_bytes(head[8:12], "little")
    else:
        raise io.InputError(f"{where}: .npy format version {major} is not supported")
    if len(head) < start + hlen:
        return start + hlen
    f = _io.BytesIO(head[: start + hlen])
    version = fmt.read_magic(f)
    read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
    if read is None:
        raise io.InputError(f"{where}: .npy format version {version} is not supported")
    try:
        shape, fortran, dtype = read(f)
    except ValueError as e:
        raise io.InputError(f"{where}: unreadable .npy header ({e})") from None
    if len(shape) != 2:
        raise io.InputError(f"{where}: embeddings must be 2-D [rows, dim], not shape {shape}")
    if fortran and shape[0] > 1 and shape[1] > 1:
        raise io.InputError(
            f"{where}: Fortran-ordered array (rows are not contiguous); save it with "
            "np.save(path, np.ascontiguousarray(x))"
        )
    if dtype.kind != "f":
        raise io.InputError(f"{where}: embeddings must be floating point, not {dtype}")
    return NpyHeader(int(shape[0]), int(shape[1]), dtype.str, start + hlen)


def read_header(url: str) -> NpyHeader:
    """The header of the ``.npy`` at ``url`` (one small ranged read, two for a long header)."""
    fs, path = io.url_to_fs(url)
    head = fs.cat_file(path, start=0, end=HEAD_BYTES)
    got = parse_npy_header(head, url)
    if isinstance(got, int):
        got = parse_npy_header(fs.cat_file(path, start=0, end=got), url)
    return got


def row_runs(rows: np.ndarray, gap_rows: int) -> np.ndarray:
    """``[n, 2]`` half-open runs ``[start, stop)`` covering sorted unique ``rows``, where rows at
    most ``gap_rows`` apart share a run (fewer requests for a few wasted rows)."""
    rows = np.asarray(rows, np.int64)
    if len(rows) == 0:
        return np.zeros((0, 2), np.int64)
    breaks = np.flatnonzero(np.diff(rows) > gap_rows + 1) + 1
    starts = rows[np.concatenate([[0], breaks])]
    stops = rows[np.concatenate([breaks - 1, [len(rows) - 1]])] + 1
    return np.stack([starts, stops], axis=1)


def read_rows(
    url: str,
    header: NpyHeader,
    rows: np.ndarray,
    gap_bytes: int = 1 << 20,
    counters: dict | None = None,
) -> np.ndarray:
    """Rows ``rows`` (any order, repeats allowed) of the ``.npy`` at ``url``: ``[len(rows), dim]``
    in the file's dtype.

    ``counters`` (when given) gains ``requests`` and ``bytes`` read. Raises
    :class:`pipeline.core.io.InputError` for a row outside the file or a short read.
    """
    rows = np.asarray(rows, np.int64)
    out_dtype = np.dtype(header.dtype)
    if len(rows) == 0:
        return np.zeros((0, header.dim), out_dtype)
    if rows.min() < 0 or rows.max() >= header.rows:
        raise io.InputError(
            f"{url}: row {int(rows.max() if rows.max() >= header.rows else rows.min())} is "
            f"outside the file's {header.rows} rows"
        )
    uniq, inverse = np.unique(rows, return_inverse=True)
    counters = counters if counters is not None else {}
    if io.is_local(url):
        _, path = io.url_to_fs(url)
        mm = np.memmap(path, out_dtype, "r", header.offset, (header.rows, header.dim))
        got = np.array(mm[uniq])
        counters["requests"] = counters.get("requests", 0) + 1
        counters["bytes"] = counters.get("bytes", 0) + len(uniq) * header.row_bytes
        del mm
        return got[inverse]
    runs = row_runs(uniq, gap_bytes // header.row_bytes)
    rb = header.row_bytes
    fs, path = io.url_to_fs(url)
    starts = (header.offset + runs[:, 0] * rb).tolist()
    ends = (header.offset + runs[:, 1] * rb).tolist()
    blobs = fs.cat_ranges([path] * len(runs), starts, ends)
    got = np.empty((len(uniq), header.dim), out_dtype)
    pos = 0
    for (a, b), blob in zip(runs.tolist(), blobs):
        if isinstance(blob, Exception):
            raise io.InputError(f"{url}: reading rows {a}-{b - 1} failed ({blob!r})")
        if len(blob) != (b - a) * rb:
            raise io.InputError(
                f"{url}: short read of rows {a}-{b - 1} ({len(blob)} of {(b - a) * rb} bytes); "
                "the file is truncated"
            )
        block = np.frombuffer(blob, out_dtype).reshape(b - a, header.dim)
        n = int(np.searchsorted(uniq, b) - pos)
        got[pos : pos + n] = block[uniq[pos : pos + n] - a]
        pos += n
    counters["requests"] = counters.get("requests", 0) + len(runs)
    counters["bytes"] = counters.get("bytes", 0) + int(sum(e - s for s, e in zip(starts, ends)))
    return got[inverse]


def read_all(url: str, header: NpyHeader) -> np.ndarray:
    """Every row of the ``.npy`` at ``url`` (one read; a memory map where local)."""
    dtype = np.dtype(header.dtype)
    if header.rows == 0:
        return np.zeros((0, header.dim), dtype)
    if io.is_local(url):
        _, path = io.url_to_fs(url)
        return np.array(np.memmap(path, dtype, "r", header.offset, (header.rows, header.dim)))
    fs, path = io.url_to_fs(url)
    blob = fs.cat_file(path, start=header.offset, end=header.nbytes)
    if len(blob) != header.nbytes - header.offset:
        raise io.InputError(f"{url}: short read ({len(blob)} bytes); the file is truncated")
    return np.frombuffer(blob, dtype).reshape(header.rows, header.dim)
