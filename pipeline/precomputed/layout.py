"""A folder of precomputed embeddings in the LAION / clip-retrieval layout, checked once.

``img_emb/img_emb_<i>.npy`` (float16 or float32 ``[N_i, D]``) beside
``metadata/metadata_<i>.parquet`` (the same ``N_i`` rows in the same order). Files are found by
two globs and paired by the number ``<i>`` in their names (leading zeros allowed), and ordered
by it; a row's global id is its position in that order (what autofaiss and clip-retrieval
index, for zero-padded names). :func:`open_folder` reads every ``.npy`` header and parquet
footer and refuses, naming the files, a file without its partner, row counts that differ, a
dimension that differs from the others, a truncated ``.npy`` and a metadata file without a
URL column.
"""

from __future__ import annotations

import logging
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import io
from pipeline.precomputed.config import PrecomputedConfig
from pipeline.precomputed.reader import NpyHeader, read_header

log = logging.getLogger(__name__)

# Problems listed in one error before the rest are only counted.
MAX_LISTED = 10


@dataclass(frozen=True)
class SourceFile:
    """One ``.npy`` and its metadata: ``index`` in folder order, the ``number`` in their names,
    the npy ``header``, ``first`` (global id of its row 0) and the metadata's URL and caption
    column names (``caption_col`` None when it has none)."""

    index: int
    number: int
    emb: str
    meta: str
    header: NpyHeader
    first: int
    url_col: str
    caption_col: str | None

    @property
    def rows(self) -> int:
        return self.header.rows


@dataclass(frozen=True)
class Folder:
    """A checked embedding folder: its ``files`` in order, all of dimension ``dim``."""

    root: str
    files: tuple[SourceFile, ...]
    dim: int

    @property
    def rows(self) -> int:
        return self.files[-1].first + self.files[-1].rows if self.files else 0

    def starts(self) -> np.ndarray:
        """Global id of each file's row 0, with the total appended (``len(files) + 1``)."""
        return np.array([f.first for f in self.files] + [self.rows], np.int64)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global ids -> ``(file positions, rows in those files)``."""
        ids = np.asarray(ids, np.int64)
        pos = np.searchsorted(self.starts(), ids, side="right") - 1
        return pos, ids - self.starts()[pos]

    def fingerprint(self) -> dict:
        """What identifies the folder's rows: every file pair, its rows, dtype and the dim."""
        return {
            "root": self.root,
            "dim": self.dim,
            "files": [[f.emb, f.meta, f.rows, f.header.dtype] for f in self.files],
        }

    def file_of(self, meta_urls: list[str | None]) -> np.ndarray:
        """Folder position of each metadata file URL (``-1`` when not in the folder).

        A URL matches a file's metadata URL exactly, else by its file name when exactly one
        file has that name (the text filter may have read the same metadata at another
        address: a local copy, another bucket).
        """
        exact = {_norm(f.meta): f.index for f in self.files}
        names: dict[str, list[int]] = {}
        for f in self.files:
            names.setdefault(posixpath.basename(f.meta), []).append(f.index)
        out = np.full(len(meta_urls), -1, np.int64)
        cache: dict[str | None, int] = {}
        for i, u in enumerate(meta_urls):
            if u not in cache:
                hit = exact.get(_norm(u)) if u else None
                if hit is None and u:
                    by_name = names.get(posixpath.basename(u.rstrip("/")), [])
                    hit = by_name[0] if len(by_name) == 1 else None
                cache[u] = -1 if hit is None else hit
            out[i] = cache[u]
        return out


def _norm(url: str | None) -> str | None:
    if url is None:
        return None
    if io.is_local(url):
        return posixpath.normpath(url.removeprefix("file://"))
    return url


def _number(url: str) -> int | None:
    stem = posixpath.basename(url).rsplit(".", 1)[0]
    m = re.search(r"(\d+)\D*$", stem)
    return int(m.group(1)) if m else None


def _list(root: str, pattern: str) -> dict[str, int]:
    """URL -> size of the files ``root/pattern`` matches (hidden and ``_`` names skipped)."""
    fs, path = io.url_to_fs(io.join(root, pattern))
    found = fs.glob(path, detail=True)
    out = {}
    for p, info in found.items():
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith((".", "_")) or info.get("type") == "directory":
            continue
        out[io.unstrip(fs, p)] = int(info.get("size") or 0)
    return out


def _by_number(files: dict[str, int], what: str, problems: list[str]) -> dict[int, str]:
    out: dict[int, str] = {}
    for url in sorted(files):
        n = _number(url)
        if n is None:
            problems.append(f"{url}: no number in its name to pair the {what} file by")
        elif n in out:
            problems.append(f"{out[n]} and {url} carry the same number {n}")
        else:
            out[n] = url
    return out


def _resolve(schema: pa.Schema, candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in schema.names), None)


def open_folder(root: str, cfg: PrecomputedConfig | None = None) -> Folder:
    """List, pair and check the files of the embedding folder ``root`` (any fsspec URL).

    Raises :class:`pipeline.core.io.InputError` listing every problem found (each naming its
    file): no files, an unpaired file, a row count or dimension mismatch, a bad or truncated
    ``.npy``, an unreadable footer, a metadata file without a URL column.
    """
    cfg = cfg or PrecomputedConfig()
    root = root.rstrip("/")
    embs = _list(root, cfg.emb_glob)
    metas = _list(root, cfg.meta_glob)
    if not embs or not metas:
        missing = cfg.emb_glob if not embs else cfg.meta_glob
        raise io.InputError(
            f"{root}: no files match {missing!r}; a clip-retrieval folder holds "
            "img_emb/img_emb_<i>.npy and metadata/metadata_<i>.parquet (set --emb-glob / "
            "--meta-glob for other names)"
        )
    problems: list[str] = []
    e_num = _by_number(embs, "embedding", problems)
    m_num = _by_number(metas, "metadata", problems)
    for n in sorted(set(e_num) - set(m_num)):
        problems.append(f"{e_num[n]} has no metadata file numbered {n} (under {cfg.meta_glob})")
    for n in sorted(set(m_num) - set(e_num)):
        problems.append(f"{m_num[n]} has no embedding file numbered {n} (under {cfg.emb_glob})")
    numbers = sorted(set(e_num) & set(m_num))

    def inspect(n: int):
        try:
            h = read_header(e_num[n])
        except io.InputError as e:
            return e
        except Exception as e:  # an unreadable object: named, like a bad header
            return io.InputError(f"{e_num[n]}: cannot read ({type(e).__name__}: {e})")
        try:
            fs, path = io.url_to_fs(m_num[n])
            with fs.open(path, "rb") as fh:
                md = pq.read_metadata(fh)
            return h, md.num_rows, md.schema.to_arrow_schema()
        except Exception as e:
            return io.InputError(
                f"{m_num[n]}: not a readable parquet file ({type(e).__name__}: {e})"
            )

    with ThreadPoolExecutor(max(1, min(cfg.io_threads * 2, len(numbers) or 1))) as pool:
        seen = list(pool.map(inspect, numbers))
    files: list[SourceFile] = []
    first = 0
    for n, got in zip(numbers, seen):
        if isinstance(got, Exception):
            problems.append(str(got))
            continue
        h, meta_rows, schema = got
        emb, meta = e_num[n], m_num[n]
        if embs[emb] and embs[emb] != h.nbytes:
            problems.append(
                f"{emb}: {embs[emb]} bytes but its header says {h.rows} x {h.dim} {h.dtype} "
                f"({h.nbytes} bytes); the file is truncated or corrupt"
            )
            continue
        if meta_rows != h.rows:
            problems.append(
                f"{meta} has {meta_rows} rows but {emb} has {h.rows} embeddings; the two must "
                "hold the same rows in the same order"
            )
            continue
        url_col = _resolve(schema, cfg.url_columns)
        if url_col is None:
            problems.append(
                f"{meta}: no URL column (tried {list(cfg.url_columns)}; it has {schema.names}); "
                "set precomputed.url_columns"
            )
            continue
        if files and h.dim != files[0].header.dim:
            problems.append(
                f"{emb} has dimension {h.dim} but {files[0].emb} has {files[0].header.dim}: "
                "a folder holds one model's embeddings"
            )
            continue
        files.append(
            SourceFile(
                len(files), n, emb, meta, h, first, url_col, _resolve(schema, cfg.caption_columns)
            )
        )
        first += h.rows
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise io.InputError(f"embedding folder {root}: " + "; ".join(problems[:MAX_LISTED]) + more)
    log.info(
        "embedding folder %s: %d files, %d rows of dim %d",
        root,
        len(files),
        first,
        files[0].header.dim,
    )
    return Folder(root, tuple(files), files[0].header.dim)


def read_metadata(f: SourceFile, columns: list[str], rows: np.ndarray | None = None) -> pa.Table:
    """Columns ``columns`` of ``f``'s metadata (names as in the file), every row or the rows
    ``rows`` (in that order), reading only the row groups that hold them."""
    fs, path = io.url_to_fs(f.meta)
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        if rows is None:
            return pf.read(columns=columns)
        rows = np.asarray(rows, np.int64)
        sizes = np.array([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        starts = np.concatenate([[0], np.cumsum(sizes)])
        groups = np.unique(np.searchsorted(starts, rows, side="right") - 1)
        table = pf.read_row_groups(groups.tolist(), columns=columns)
    # Row r sits at r - (rows of the unread groups before it) in the table read.
    skipped = starts[groups] - np.concatenate([[0], np.cumsum(sizes[groups])[:-1]])
    g_of = np.searchsorted(starts[groups], rows, side="right") - 1
    return table.take(pa.array(rows - skipped[g_of]))
