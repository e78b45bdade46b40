"""Matches resolved to rows of an embedding folder, and those rows gathered.

A match made by the text filter from the folder's own metadata names its ``source_file`` and
``source_row`` (:func:`resolve_by_source`); any other match (metadata from elsewhere, a file the
folder lacks, a row past its end) is joined on URL (:func:`join_on_url`): the row whose
``(url, caption)`` gives the match's uid, else the first row with its URL, in folder order.
:func:`gather_file` reads one file's rows by byte range and returns them L2-normalised, each
checked (a non-finite or zero vector, a metadata URL that is not the match's).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import io
from pipeline.precomputed.layout import Folder, SourceFile, read_metadata
from pipeline.precomputed.reader import read_rows

SOURCE_COLUMNS = ("source_file", "source_row")


def resolve_by_source(matches: pa.Table, folder: Folder) -> tuple[np.ndarray, np.ndarray, Counter]:
    """Each match's ``(folder file position, row)`` from its source columns, ``-1`` where they
    do not resolve, with the reasons counted: ``no_source`` (columns absent or null),
    ``file_not_in_folder``, ``row_out_of_range``."""
    n = matches.num_rows
    pos = np.full(n, -1, np.int64)
    rows = np.full(n, -1, np.int64)
    why: Counter = Counter()
    if not set(SOURCE_COLUMNS) <= set(matches.column_names):
        why["no_source"] += n
        return pos, rows, why
    files = matches.column("source_file").to_pylist()
    r = matches.column("source_row").to_numpy(zero_copy_only=False)
    r = np.nan_to_num(np.asarray(r, np.float64), nan=-1).astype(np.int64)
    has = np.array([f is not None for f in files], bool) & (r >= 0)
    why["no_source"] += int((~has).sum())
    p = folder.file_of(files)
    in_folder = has & (p >= 0)
    why["file_not_in_folder"] += int((has & (p < 0)).sum())
    sizes = np.array([f.rows for f in folder.files] + [0], np.int64)
    in_range = in_folder & (r < sizes[p])
    why["row_out_of_range"] += int((in_folder & ~in_range).sum())
    pos[in_range], rows[in_range] = p[in_range], r[in_range]
    return pos, rows, why


def join_on_url(
    meta_urls: pa.Array | pa.ChunkedArray,
    meta_captions: pa.Array | pa.ChunkedArray | None,
    want_urls: list[str],
    want_uids: list[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows of one metadata file that the wanted matches join to: ``(indices into the
    wanted lists, rows, exact)``, one entry per wanted match whose URL the file holds.

    ``exact`` is True where the row's ``uid(url, caption)`` is the match's uid (that row is
    taken); else the file's first row with the URL.
    """
    empty = np.zeros(0, np.int64)
    if not want_urls or len(meta_urls) == 0:
        return empty, empty, np.zeros(0, bool)
    uniq = list(dict.fromkeys(want_urls))
    at = pc.index_in(meta_urls, value_set=pa.array(uniq, pa.string()))
    hit_rows = np.flatnonzero(at.is_valid().to_numpy(zero_copy_only=False))
    if not len(hit_rows):
        return empty, empty, np.zeros(0, bool)
    hit_url = at.take(pa.array(hit_rows)).to_numpy(zero_copy_only=False).astype(np.int64)
    urls = pa.array(uniq).take(pa.array(hit_url)).to_pylist()
    caps = (
        meta_captions.take(pa.array(hit_rows)).to_pylist()
        if meta_captions is not None
        else [None] * len(hit_rows)
    )
    first: dict[int, int] = {}
    by_uid: dict[str, int] = {}
    for row, u, url, cap in zip(hit_rows.tolist(), hit_url.tolist(), urls, caps):
        first.setdefault(u, row)
        by_uid.setdefault(io.make_uid(url, cap), row)
    url_index = {u: i for i, u in enumerate(uniq)}
    idx, rows, exact = [], [], []
    for i, (url, uid) in enumerate(zip(want_urls, want_uids)):
        u = url_index[url]
        if u not in first:
            continue
        row = by_uid.get(uid)
        idx.append(i)
        rows.append(first[u] if row is None else row)
        exact.append(row is not None)
    return np.array(idx, np.int64), np.array(rows, np.int64), np.array(exact, bool)


def best_joins(
    n_want: int, found: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge :func:`join_on_url`'s answers of several files (``(file position, indices, rows,
    exact)`` each) into one row per wanted match: an exact row before a URL-only one, then the
    earliest in folder order. Returns ``(file positions, rows, exact)``; ``-1`` where none."""
    pos = np.full(n_want, -1, np.int64)
    rows = np.full(n_want, -1, np.int64)
    exact = np.zeros(n_want, bool)
    best = np.full(n_want, np.iinfo(np.int64).max, np.int64)
    for p, idx, r, ex in sorted(found, key=lambda t: t[0]):
        # Rank: exact rows first, then folder order (files in order, rows within a file).
        rank = np.where(ex, 0, 1 << 62) + p * (1 << 40) + r
        better = rank < best[idx]
        sel = idx[better]
        best[sel], pos[sel], rows[sel], exact[sel] = rank[better], p, r[better], ex[better]
    return pos, rows, exact


def unit_rows(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(float32 L2-normalised rows, usable)``: a row whose norm is zero or not finite (a NaN
    or infinite value) is not usable, and left zero."""
    x = np.array(raw, np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x)) if len(x) else np.zeros(0, np.float32)
    ok = np.isfinite(norms) & (norms > 0)
    x /= np.where(ok, norms, 1.0)[:, None]
    if not ok.all():
        x[~ok] = 0.0
    return x, ok


def gather_file(
    f: SourceFile,
    rows: np.ndarray,
    want_urls: list[str] | None,
    gap_bytes: int,
    counters: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``rows`` of file ``f``: ``(float32 unit vectors, usable, url_matches)``.

    ``usable`` is False for a non-finite or zero vector; ``url_matches`` is False where
    ``want_urls`` is given and the metadata URL at the row differs (the folder is not the
    metadata the match came from). ``counters`` gains the bytes and requests read.
    """
    feats, ok = unit_rows(read_rows(f.emb, f.header, rows, gap_bytes, counters))
    agree = np.ones(len(rows), bool)
    if want_urls is not None and len(rows):
        got = read_metadata(f, [f.url_col], rows).column(0).to_pylist()
        agree = np.array([a == b for a, b in zip(got, want_urls)], bool)
    return feats, ok, agree
