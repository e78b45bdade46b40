"""Stage 1: keep the LAION rows whose captions name a target class (Spark over parquet).

How it runs: the driver lists the input files and checks every file's schema from its parquet
footer (a missing column fails at once, naming the file). The scan's units are the files, a
file of more than ``split_rows`` rows cut into runs of whole row groups (:func:`plan_units`);
Spark distributes them to tasks (consecutive small units share a task, :func:`task_groups`);
each task reads its units one at a time with pyarrow (Arrow's own file where local, else
fsspec: ``s3://``, ``hf://``, any fsspec URL), in record batches of the needed columns only,
matches a whole batch at a time (:mod:`pipeline.text_filter.matcher`), applies the row-local filters (size,
safety, similarity, caption length) and writes its matches to
``<out>/_scan/part-<unit index>.parquet`` with the unit's stats next to it. A rerun reuses the
scan parts that exist, so a killed job resumes.

The global filters run after the scan, on the driver, in numpy: each task also writes the
keys of its matches to ``_scan/part-<index>.keys`` (uid and a MurmurHash3-128 digest of the URL
as integer words, and the label: 37 bytes a match, some 4 GB for 100M matches, which must fit in
driver memory). A row found in several input files is kept once; URL de-duplication keeps the
row of the smallest uid of each URL; the per-class cap keeps the ``max_per_class`` rows with
the smallest seeded hash of their uid (:func:`cap_hash`: a pseudo-random sample, not the first
rows in file order). A scan part that loses no rows is already final (rows in file order, each
(uid, label) once) and is hard-linked (or copied) into place as ``part-<unit index>.parquet``; for
the others the driver writes the numbers of the surviving rows to ``_scan/keep-<index>.rows``
and Spark tasks rewrite them. Either way the same input and config give the same files, byte
for byte.

Output at ``--out``: ``part-<unit index>.parquet`` (see docs/architecture.md for the columns),
``_stats.json``, ``_config.json`` and ``_SUCCESS`` last. The JSON files carry a leading
underscore so that ``pyarrow.dataset.dataset(out)`` (which skips ``_``/``.`` names) reads the
parquet parts alone; a plain ``stats.json`` there makes it fail.
"""

from __future__ import annotations

import argparse
import binascii
import gc
import hashlib
import importlib
import logging
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import io
from pipeline.core.config import load_dataset, stage_config, to_dict
from pipeline.text_filter.matcher import ENGINES

log = logging.getLogger(__name__)

# Canonical column -> candidate source names (original LAION-2B-en first, then Re-LAION).
DEFAULT_COLUMNS: dict[str, list[str]] = {
    "url": ["URL", "url"],
    "caption": ["TEXT", "caption", "text"],
    "width": ["WIDTH", "width"],
    "height": ["HEIGHT", "height"],
    "similarity": ["similarity"],
    "punsafe": ["punsafe"],
    "pwatermark": ["pwatermark"],
}
REQUIRED = ("url", "caption")
OPTIONAL_TYPES = {
    "width": pa.int64(),
    "height": pa.int64(),
    "similarity": pa.float64(),
    "punsafe": pa.float64(),
    "pwatermark": pa.float64(),
}
SCAN_DIR = "_scan"
# The layout of the scan parts and their keys files; a failed run's scans of another layout are
# not reused. 2: URL keys are MurmurHash3-128 (BLAKE2b-128 before). 3: a part per scan unit
# (a file, or a run of a large file's row groups), numbered in input order. 4: matches whose URL
# holds a control character are dropped by the scan.
SCAN_FORMAT = 4
# Underscore names: pyarrow.dataset.dataset(out) skips them and reads the parquet parts alone.
STATS = "_stats.json"
CONFIG = "_config.json"


@dataclass(frozen=True)
class TextFilterConfig:
    """Settings of the text filter (section ``filter``).

    Size/safety filters are off at their defaults (0 / 1.0 / 0). ``max_per_class`` 0 keeps
    every match. ``columns`` maps canonical names to the source column names to try.
    ``split_rows``: a file of more rows is scanned in pieces of whole row groups, about that many
    rows each (0: never split); ``task_rows``: consecutive small pieces share a Spark task up to
    that many rows (0: a task per piece). See :func:`split_row_groups` and :func:`task_groups`.
    ``global_memory_mb``: what the driver's global filters may hold; more matches than fit are
    filtered in URL buckets, one at a time (0: no limit). See :func:`global_buckets`.
    """

    columns: dict = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_COLUMNS.items()})
    keep_ambiguous: bool = False
    min_width: int = 0
    min_height: int = 0
    max_punsafe: float = 1.0
    min_similarity: float = 0.0
    max_caption_chars: int = 4096
    dedup_urls: bool = True
    max_per_class: int = 0
    seed: int = 0
    skip_bad_files: bool = False
    batch_rows: int = 65536
    engine: str = "auto"
    task_rows: int = 4_000_000
    split_rows: int = 4_000_000
    global_memory_mb: int = 4096

    def __post_init__(self) -> None:
        problems = []
        missing = [c for c in REQUIRED if not self.columns.get(c)]
        if missing:
            problems.append(f"columns must name source columns for {missing}")
        if self.max_per_class < 0:
            problems.append("max_per_class must be >= 0 (0 = no cap)")
        if not 0.0 <= self.max_punsafe <= 1.0:
            problems.append("max_punsafe must be in [0, 1]")
        if self.batch_rows < 1:
            problems.append("batch_rows must be >= 1")
        if self.task_rows < 0:
            problems.append("task_rows must be >= 0 (0 = a task per scan unit)")
        if self.split_rows < 0:
            problems.append("split_rows must be >= 0 (0 = never split a file)")
        if self.global_memory_mb < 0:
            problems.append("global_memory_mb must be >= 0 (0 = no limit)")
        if self.engine != "auto" and self.engine not in ENGINES:
            problems.append("engine must be auto or one of " + ", ".join(ENGINES))
        if problems:
            raise ValueError("; ".join(problems))


class ScanUnit(NamedTuple):
    """One piece of the scan: a whole input file, or a run of its row groups. ``index`` names
    its scan part and final part (``part-<index>``); units are numbered in input order."""

    index: int
    url: str
    row_groups: tuple[int, int] | None = None  # [lo, hi) of the file's row groups; None: all


def resolve_columns(schema: pa.Schema, mapping: dict, where: str) -> dict[str, str]:
    """Canonical name -> the column of ``schema`` that provides it.

    Raises :class:`pipeline.core.io.InputError` naming ``where`` and the column when a required
    one (url, caption) is missing.
    """
    names = set(schema.names)
    out = {}
    for canon, candidates in mapping.items():
        candidates = [candidates] if isinstance(candidates, str) else list(candidates)
        found = next((c for c in candidates if c in names), None)
        if found:
            _check_type(canon, found, schema.field(found).type, where)
            out[canon] = found
        elif canon in REQUIRED:
            raise io.InputError(
                f"{where}: required column {canon!r} not found (tried {candidates}; the file has {schema.names}). "
                "Map it with --set filter.columns.<name>=[...]"
            )
    return out


def _check_type(canon: str, column: str, typ: pa.DataType, where: str) -> None:
    """Refuse a column whose type cannot mean what its name says, at the footer, naming the
    file: an integer caption or a text ``punsafe`` is a mis-mapped column, and casting it would
    silently filter on nonsense (or fail deep inside a Spark task)."""
    t = pa.types
    if canon in REQUIRED:
        ok = t.is_string(typ) or t.is_large_string(typ) or t.is_binary(typ)
        ok = ok or t.is_large_binary(typ) or t.is_null(typ)
        want = "string or binary"
    else:
        ok = t.is_integer(typ) or t.is_floating(typ) or t.is_decimal(typ) or t.is_null(typ)
        want = "numeric"
    if not ok:
        raise io.InputError(
            f"{where}: column {column!r} (used as {canon!r}) has type {typ}, expected {want}. "
            "Map the right column with --set filter.columns.<name>=[...]"
        )


def _as_string(arr: pa.Array) -> pa.Array:
    """A string array from a string or binary column; invalid UTF-8 is replaced, never fatal."""
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        try:
            arr.validate(full=True)
            return arr
        except pa.ArrowInvalid:
            arr = arr.cast(pa.binary() if pa.types.is_string(arr.type) else pa.large_binary())
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        return pa.array(
            [None if b is None else b.decode("utf-8", "replace") for b in arr.to_pylist()],
            pa.string(),
        )
    return pc.cast(arr, pa.string())


def make_uids(urls: pa.Array, captions: pa.Array) -> pa.Array:
    """:func:`pipeline.core.io.make_uids` (BLAKE2b-128 of url, 0x1F, caption; nulls as empty), the
    same strings without a Python object per row: the fields are joined in Arrow and hashed by
    a compiled kernel (:func:`blake2b_128`)."""
    return _hex_strings(_uid_digests(urls, captions))


def _uid_digests(urls: pa.Array, captions: pa.Array) -> np.ndarray:
    """The 16 bytes of each row's uid (``uint8 [rows, 16]``), before hex."""
    joined = pc.binary_join_element_wise(urls.fill_null(""), captions.fill_null(""), "\x1f")
    return blake2b_128(joined)


def _kernels():
    """:mod:`pipeline.text_filter.kernels` (numba's compiled loops), or None where numba is missing."""
    try:
        return importlib.import_module("pipeline.text_filter.kernels")
    except ImportError:
        return None


def _row_bytes(arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, values)`` of the rows of a string or binary array to hash, nulls as empty
    (see :func:`pipeline.text_filter.matcher._buffers`)."""
    from pipeline.text_filter.matcher import _buffers

    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if not len(arr):  # an empty array may have no buffers at all
        return np.zeros(1, np.int64), np.zeros(0, np.uint8)
    arr = arr.fill_null("" if pa.types.is_string(arr.type) else b"")
    if pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type):
        arr = arr.cast(pa.binary())  # int32 offsets; text-filter batches stay far under 2 GB
    return _buffers(arr)


def _has_control_bytes(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Per row of a string or binary array: whether it holds a C0 control byte or DEL
    (0x00-0x1F, 0x7F; never part of a UTF-8 multi-byte character). Such rows are rare: one
    pass over the whole buffer first, and rows are located only where it finds one."""
    offsets, values = _row_bytes(arr)
    bad = np.zeros(len(offsets) - 1, dtype=bool)
    if not len(values) or (values.min() >= 0x20 and not (values == 0x7F).any()):
        return bad
    pos = np.flatnonzero((values < 0x20) | (values == 0x7F))
    bad[np.searchsorted(offsets, pos, side="right") - 1] = True
    return bad


def blake2b_128(arr: pa.Array) -> np.ndarray:
    """BLAKE2b with a 16-byte digest of each row of a string or binary array (nulls hash as
    empty): ``uint8 [rows, 16]``. numba's kernel where numba imports, else hashlib per row (the
    same bytes, a third of the speed)."""
    offsets, values = _row_bytes(arr)
    out = np.zeros((len(offsets) - 1, 16), dtype=np.uint8)
    if not len(out):
        return out
    kernels = _kernels()
    if kernels is None:
        digest, bounds = hashlib.blake2b, zip(offsets[:-1].tolist(), offsets[1:].tolist())
        joined = b"".join(
            [digest(values[a:b].tobytes(), digest_size=16).digest() for a, b in bounds]
        )
        return np.frombuffer(joined, dtype=np.uint8).reshape(-1, 16)
    kernels.blake2b_128(values, offsets, kernels.BLAKE2B_IV, out)
    return out


def murmur3_128(arr: pa.Array) -> np.ndarray:
    """MurmurHash3_x64_128 (seed 0) of each row of a string or binary array (nulls hash as
    empty): ``uint64 [rows, 2]``, the words (h1, h2) that ``mmh3.hash128`` joins into
    ``h2 << 64 | h1``. numba's kernel where numba imports, else the same words from numpy
    vectorised over rows (:func:`_murmur3_128_numpy`)."""
    offsets, values = _row_bytes(arr)
    kernels = _kernels()
    if kernels is None:
        return _murmur3_128_numpy(values, offsets)
    out = np.zeros((len(offsets) - 1, 2), dtype=np.uint64)
    kernels.murmur3_128(values, offsets, out)
    return out


def _murmur3_128_numpy(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """:func:`murmur3_128` without numba: block ``j`` of every row at once, for the rows that
    have one (a loop as long as the longest row's blocks, each step over the rows left)."""
    u = np.uint64
    m1, m2 = u(0x87C37B91114253D5), u(0x4CF5AD432745937F)

    def rotl(x, r):
        return (x << u(r)) | (x >> u(64 - r))

    def fmix(k):
        k = k ^ (k >> u(33))
        k = k * u(0xFF51AFD7ED558CCD)
        k = k ^ (k >> u(33))
        k = k * u(0xC4CEB9FE1A85EC53)
        return k ^ (k >> u(33))

    start, length = offsets[:-1], np.diff(offsets)
    n = len(length)
    h1, h2 = np.zeros(n, u), np.zeros(n, u)
    blocks = length // 16
    padded = np.concatenate([values, np.zeros(16, np.uint8)])  # tails read past the end
    lanes = np.arange(16)
    with np.errstate(over="ignore"):
        for j in range(int(blocks.max(initial=0))):
            sel = np.flatnonzero(blocks > j)
            k = padded[(start[sel] + 16 * j)[:, None] + lanes].view("<u8").astype(u)
            a = h1[sel] ^ (rotl(k[:, 0] * m1, 31) * m2)
            a = (rotl(a, 27) + h2[sel]) * u(5) + u(0x52DCE729)
            b = h2[sel] ^ (rotl(k[:, 1] * m2, 33) * m1)
            b = (rotl(b, 31) + a) * u(5) + u(0x38495AB5)
            h1[sel], h2[sel] = a, b
        rem = length & 15
        tail = padded[(start + 16 * blocks)[:, None] + lanes]
        tail = np.where(lanes < rem[:, None], tail, 0).astype(np.uint8).view("<u8").astype(u)
        h2 ^= np.where(rem > 8, rotl(tail[:, 1] * m2, 33) * m1, u(0))
        h1 ^= np.where(rem > 0, rotl(tail[:, 0] * m1, 31) * m2, u(0))
        h1 ^= length.astype(u)
        h2 ^= length.astype(u)
        h1 += h2
        h2 += h1
        h1, h2 = fmix(h1), fmix(h2)
        h1 += h2
        h2 += h1
    return np.stack([h1, h2], axis=1)


def _hex_strings(digests: np.ndarray) -> pa.Array:
    """Lower-case hex strings of ``uint8 [rows, k]`` (2k digits each), built in numpy."""
    n, k = digests.shape
    hexed = _HEX_PAIRS[digests]
    offsets = np.arange(0, 2 * k * n + 1, 2 * k, dtype=np.int32)
    return pa.Array.from_buffers(
        pa.string(),
        n,
        [None, pa.py_buffer(offsets), pa.py_buffer(hexed)],  # no copy
    )


def filter_batch(
    batch: pa.RecordBatch,
    cols: dict[str, str],
    matcher,
    cfg: TextFilterConfig,
    classes: list[str],
    stats: Counter,
) -> pa.Table:
    """The pure core: one record batch in, its kept matches out (canonical columns).

    Counts every row into ``stats`` by outcome: ``rows_scanned``, drops by reason
    (``null_or_empty_caption``, ``caption_too_long``, ``no_match``, ``ambiguous``, then for
    matches ``null_or_empty_url``, ``url_with_control_character``, ``too_small``,
    ``unsafe``, ``low_similarity``) and
    ``rows_matched``.
    """
    return _filter_batch(batch, cols, matcher, cfg, classes, stats)[0]


def _filter_batch(
    batch: pa.RecordBatch,
    cols: dict[str, str],
    matcher,
    cfg: TextFilterConfig,
    classes: list[str],
    stats: Counter,
) -> tuple[pa.Table, np.ndarray]:
    """:func:`filter_batch`, and the 16 bytes of each kept row's uid (the scan's match keys
    take them as they are, instead of parsing the hex back)."""
    n = batch.num_rows
    stats["rows_scanned"] += n
    # The matcher reads bytes and copes with invalid UTF-8 itself; only the text of kept rows
    # must be valid, so that is validated (and repaired) once they are known, not every caption.
    captions = batch.column(cols["caption"])
    if not (pa.types.is_string(captions.type) or pa.types.is_large_string(captions.type)):
        captions = _as_string(captions)
    urls = batch.column(cols["url"])
    # Byte lengths bound character lengths from above: count characters only where needed.
    lengths = pc.binary_length(captions).fill_null(0).to_numpy(zero_copy_only=False)
    empty = lengths == 0
    too_long = lengths > cfg.max_caption_chars
    if too_long.any():
        rows = np.flatnonzero(too_long)
        chars = pc.utf8_length(captions.take(pa.array(rows))).to_numpy(zero_copy_only=False)
        too_long[rows] = chars > cfg.max_caption_chars
    stats["dropped_null_or_empty_caption"] += int(empty.sum())
    stats["dropped_caption_too_long"] += int((too_long & ~empty).sum())
    usable = ~empty & ~too_long
    # Over-long captions are blanked before matching, so one hostile row cannot slow a batch.
    to_match = (
        captions
        if usable.all()
        else pc.if_else(pa.array(usable), captions, pa.scalar(None, pa.string()))
    )
    result = matcher.match(to_match)
    label = result.label
    stats["dropped_no_match"] += int(((label == -1) & usable).sum())
    single = np.flatnonzero(label >= 0)
    rows, labs, terms = single, label[single], result.term[single]
    if cfg.keep_ambiguous:
        # An ambiguous row once under each class it names; rows stay in file order.
        rows = np.concatenate([rows, result.amb_row])
        labs = np.concatenate([labs, result.amb_label])
        terms = np.concatenate([terms, result.amb_term])
        order = np.lexsort((labs, rows))
        rows, labs, terms = rows[order], labs[order], terms[order]
    else:
        stats["dropped_ambiguous"] += int((label == -2).sum())
    if not len(rows):
        return _empty_output(cols), np.zeros((0, 16), np.uint8)
    idx = pa.array(rows, pa.int64())
    # A match without a URL cannot be downloaded: dropped first (it never reaches the global
    # URL de-duplication).
    url_sel = urls.take(idx)
    keep = pc.binary_length(url_sel).fill_null(0).to_numpy(zero_copy_only=False) > 0
    stats["dropped_null_or_empty_url"] += int((~keep).sum())
    # A control character is never part of a URL as written (it cannot be fetched); 0x1F, the
    # uid's separator, would also let two rows share a uid (URL "a\x1fb" with caption "c" and
    # URL "a" with "b\x1fc"). Without them a uid names one URL, which the global filters'
    # buckets rely on (a row's repeats fall in its URL's bucket).
    bad_url = _has_control_bytes(url_sel) & keep
    stats["dropped_url_with_control_character"] += int(bad_url.sum())
    keep &= ~bad_url
    extra = {}
    for canon, typ in OPTIONAL_TYPES.items():
        if canon in cols:
            extra[canon] = pc.cast(batch.column(cols[canon]).take(idx), typ, safe=False)
    if "width" in extra or "height" in extra:
        w = extra["width"].to_numpy(zero_copy_only=False) if "width" in extra else None
        h = extra["height"].to_numpy(zero_copy_only=False) if "height" in extra else None
        small = np.zeros(len(rows), dtype=bool)
        if w is not None and cfg.min_width:
            small |= np.nan_to_num(w.astype(np.float64), nan=0) < cfg.min_width
        if h is not None and cfg.min_height:
            small |= np.nan_to_num(h.astype(np.float64), nan=0) < cfg.min_height
        stats["dropped_too_small"] += int((small & keep).sum())
        keep &= ~small
    if "punsafe" in extra and cfg.max_punsafe < 1.0:
        unsafe = (
            np.nan_to_num(extra["punsafe"].to_numpy(zero_copy_only=False), nan=1.0)
            > cfg.max_punsafe
        )
        stats["dropped_unsafe"] += int((unsafe & keep).sum())
        keep &= ~unsafe
    if "similarity" in extra and cfg.min_similarity > 0:
        low = (
            np.nan_to_num(extra["similarity"].to_numpy(zero_copy_only=False), nan=0.0)
            < cfg.min_similarity
        )
        stats["dropped_low_similarity"] += int((low & keep).sum())
        keep &= ~low
    if not keep.all():
        k = np.flatnonzero(keep)
        rows, labs, terms = rows[k], labs[k], terms[k]
        extra = {c: v.take(pa.array(k)) for c, v in extra.items()}
        url_sel = url_sel.take(pa.array(k))
    url_sel = _as_string(url_sel)
    cap_sel = _as_string(captions.take(pa.array(rows)))
    labels = pa.array(labs.astype(np.int32))
    uid_digests = _uid_digests(url_sel, cap_sel)  # after the filters: hashing is per kept row
    table = pa.table(
        {
            "uid": _hex_strings(uid_digests),
            "url": url_sel,
            "caption": cap_sel,
            "label": labels,
            "class_name": pa.array(classes, pa.string()).take(labels),
            "matched_term": pa.array([t.text for t in matcher.terms], pa.string()).take(
                pa.array(terms)
            ),
            **extra,
        }
    )
    stats["rows_matched"] += table.num_rows
    return table, uid_digests


def _output_schema(cols: dict[str, str]) -> pa.Schema:
    fields = [
        pa.field("uid", pa.string()),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("label", pa.int32()),
        pa.field("class_name", pa.string()),
        pa.field("matched_term", pa.string()),
    ]
    fields += [pa.field(c, t) for c, t in OPTIONAL_TYPES.items() if c in cols]
    return pa.schema(fields)


def _empty_output(cols: dict[str, str]) -> pa.Table:
    return _output_schema(cols).empty_table()


# ---------------------------------------------------------------------- scan tasks


def _write_part(table: pa.Table, f) -> None:
    """A part as :func:`pipeline.core.io.write_parquet` writes one (zstd) into the open file ``f``,
    with dictionary pages only for the low-cardinality columns: dictionaries of uids, URLs and
    captions cost a fifth of the write time and save nothing."""
    pq.write_table(
        table,
        f,
        compression="zstd",
        use_dictionary=["label", "class_name", "matched_term"],
        # Min/max of URLs and captions prune nothing and cost a tenth of the write.
        write_statistics=[c for c in table.column_names if c not in ("url", "caption")],
    )


def _keys_path(out: str, index: int) -> str:
    return io.join(out, SCAN_DIR, f"part-{index:05d}.keys")


def _piece_paths(out: str, index: int) -> tuple[str, str]:
    return io.join(out, SCAN_DIR, f"part-{index:05d}.parquet"), io.join(
        out, SCAN_DIR, f"part-{index:05d}.stats.json"
    )


# The matcher of the last dataset, per process: a Spark worker runs many scan tasks of one job,
# and building the terms of 1000 classes costs some 20 ms a task.
_MATCHER: dict = {}


def _matcher(classes: list[str], synonyms: dict, engine: str):
    from pipeline.text_filter.matcher import Matcher

    key = (tuple(classes), tuple((k, tuple(v)) for k, v in sorted(synonyms.items())), engine)
    if key not in _MATCHER:
        _MATCHER.clear()
        _MATCHER[key] = Matcher(classes, synonyms, engine=engine)
    return _MATCHER[key]


def _open_input(url: str):
    """An input file for reading: Arrow's own file for a local path (column chunks read
    straight into Arrow buffers; through a Python file object each read is copied once more,
    a tenth of the read time), else the fsspec file."""
    fs, path = io.url_to_fs(url)
    return pa.OSFile(path, "rb") if io.is_local(url) else fs.open(path, "rb")


def scan_file(
    index: int,
    url: str,
    out: str,
    cfg: TextFilterConfig,
    classes: list[str],
    synonyms: dict,
    publish: Callable[[Callable[[], None]], None] | None = None,
    row_groups: tuple[int, int] | None = None,
) -> dict:
    """Scan one input file, or its row groups ``[lo, hi)`` (``row_groups``), into
    ``<out>/_scan/part-<index>.parquet`` and return its stats.

    Reuses a completed scan part (its stats file is written after the part and its keys). With
    ``skip_bad_files`` an unreadable file is reported in the stats instead of raising.
    ``publish`` takes the step that makes the written part, keys and stats durable and visible
    (:func:`scan_files` runs it on another thread); without it, the step runs before returning.
    """
    part, stats_url = _piece_paths(out, index)
    if io.exists(stats_url):
        return io.read_json(stats_url)
    where, piece = url, {}
    if row_groups is not None:
        where = f"{url} (row groups {row_groups[0]}-{row_groups[1] - 1})"
        piece = {"row_groups": list(row_groups)}
    t0 = time.perf_counter()
    stats: Counter = Counter()
    timings = {"read_s": 0.0, "match_s": 0.0, "write_s": 0.0}
    # Only reading is guarded: a file that cannot be read is bad input (named, or skipped and
    # listed); an error in the matching code is a bug and always fails the job.
    tables, uid_digests = [], []
    matcher = _matcher(classes, synonyms, cfg.engine)
    try:
        with _open_input(url) as fh:
            pf = pq.ParquetFile(fh)
            cols = resolve_columns(pf.schema_arrow, cfg.columns, url)
            batches = pf.iter_batches(
                batch_size=cfg.batch_rows,
                row_groups=None if row_groups is None else range(*row_groups),
                columns=sorted(set(cols.values())),
            )
            while True:
                t = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                finally:
                    timings["read_s"] += time.perf_counter() - t
                t = time.perf_counter()
                try:
                    table, digests = _filter_batch(batch, cols, matcher, cfg, classes, stats)
                    tables.append(table)
                    uid_digests.append(digests)
                except Exception as e:  # not a read error: never skipped as a bad file
                    raise RuntimeError(f"{where}: text filter failed on a batch: {e!r}") from e
                timings["match_s"] += time.perf_counter() - t
    except io.InputError:
        raise
    except (OSError, pa.ArrowException, ValueError) as e:
        if not cfg.skip_bad_files:
            raise io.InputError(f"{where}: cannot read parquet ({type(e).__name__}: {e})") from e
        result = {"file": url, **piece, "bad_file": f"{type(e).__name__}: {e}"}
        io.write_json(stats_url, result)
        return result
    table = pa.concat_tables(tables) if tables else _empty_output(cols)
    t = time.perf_counter()
    # Repeats of a (uid, label) (the same row twice in a file) dropped, the first kept; rows
    # stay in file order. numpy over the keys' integer words, no string sort.
    keys = match_keys(table, np.concatenate(uid_digests) if uid_digests else None)
    # Contiguous columns: the packed records' fields are unaligned, slow to index.
    hi, lo, lab = (np.ascontiguousarray(keys[f]) for f in ("uid_hi", "uid_lo", "label"))
    order = _sort_keys(hi, lo, lab, np.arange(len(keys)))
    first = _first_of_runs(hi[order], lo[order], lab[order])
    if not first.all():
        keep = np.zeros(len(keys), dtype=bool)
        keep[order[first]] = True
        table, keys = table.filter(pa.array(keep)), keys[keep]
    stats["dropped_duplicate_row"] += stats["rows_matched"] - table.num_rows
    stats["rows_matched"] = table.num_rows
    # Keys in a file of their own, not in the task's result: collected results are capped
    # (spark.driver.maxResultSize, 1 GB by default), and a resumed run finds them here too.
    staged: list[io.StagedFile] = []

    def commit() -> None:
        t = time.perf_counter()
        try:
            for s in staged:  # the part and its keys durable (or uploaded) before the marker
                s.commit()
        finally:
            for s in staged:  # no temporary left behind by one not reached (a no-op if done)
                s.discard()
        result["timings"]["publish_s"] = time.perf_counter() - t
        io.write_json(stats_url, result)

    # Until the commit step is handed over, any error (an interrupt included) discards the
    # temporaries: on object stores they are local files no rerun would find.
    try:
        staged.append(io.StagedFile(part))
        staged.append(io.StagedFile(_keys_path(out, index)))
        with staged[0].open() as f:
            _write_part(table, f)
        with staged[1].open() as f:
            f.write(keys.view(np.uint8))  # its bytes, not a copy
        timings["write_s"] += time.perf_counter() - t
        labels, label_counts = np.unique(keys["label"], return_counts=True)
        result = {
            "file": url,
            **piece,
            "counts": dict(stats),
            "per_class": {str(k): int(v) for k, v in zip(labels.tolist(), label_counts.tolist())},
            # publish_s, the commit's own time, is added by it (and so is in the marker).
            "timings": {**timings, "total_s": time.perf_counter() - t0},
        }
        if publish is None:
            commit()
        else:
            publish(commit)
    except BaseException:
        for s in staged:
            s.discard()
        raise
    return result


def scan_files(
    files: list[ScanUnit] | list[tuple[int, str]],
    out: str,
    cfg: TextFilterConfig,
    classes: list[str],
    synonyms: dict,
) -> list[dict]:
    """:func:`scan_file` over one task's scan units (:class:`ScanUnit`, or ``(index, url)``
    for whole files) in order; their stats.

    Each file's commit (fsync and rename, or upload to an object store, of its part and keys,
    then its stats marker) runs on a background thread while the next file is scanned: on a
    local disk the fsyncs wait about 20 ms per 500k-row file (of some 0.5 s) with the core
    idle; uploads to an object store wait longer. The task returns once every commit is done.
    A failed commit stops the task before its next file, with that error; a file whose commit
    failed has no marker and is rescanned by a rerun. When a scan fails, the commits still
    pending finish first (the files before it keep their markers), and any of them that
    failed are logged and noted on the scan's error.
    """
    from concurrent.futures import ThreadPoolExecutor, wait

    results = []
    pending: list = []

    def raise_failed() -> None:
        for p in pending:
            if p.done() and p.exception() is not None:
                raise p.exception()

    # One thread: commits run in file order.
    with ThreadPoolExecutor(1, thread_name_prefix="primer-commit") as pool:

        def publish(step: Callable[[], None]) -> None:
            pending.append(pool.submit(step))

        try:
            for unit in files:
                raise_failed()  # no more work behind a commit that failed (a full disk)
                index, url, *rest = unit
                results.append(
                    scan_file(
                        index, url, out, cfg, classes, synonyms, publish, rest[0] if rest else None
                    )
                )
            wait(pending)
            raise_failed()
            _freeze_worker_heap()
        except BaseException as e:
            wait(pending)
            for p in pending:
                err = p.exception()
                if err is not None and err is not e:
                    log.error("text filter: publishing a scan part failed: %r", err)
                    e.add_note(f"also, publishing a scan part failed: {err!r}")
            raise
    return results


_heap_frozen = False


def _freeze_worker_heap() -> None:
    """In a Spark task, once per Python worker: move the objects alive after its first scan
    (numba's and pyarrow's modules, the compiled kernels, the cached matcher) out of the
    garbage collector's reach (``gc.freeze``).

    PySpark's daemon runs ``gc.collect()`` in a reused worker after every task, before it
    takes the next. A full collection walks every tracked object: some 150k once numba is
    loaded, 0.1-0.2 s here, which sat between one task and the next on each worker (0.14 s of
    a 0.19 s gap, against 0.05 s for a trivial task). Frozen, it walks only what later tasks
    leave. Not in the driver or a test process, whose objects a freeze would keep forever.
    """
    global _heap_frozen
    if _heap_frozen:
        return
    try:
        from pyspark import TaskContext
    except ImportError:  # not in a Spark worker, then
        return
    if TaskContext.get() is None:
        return
    gc.freeze()
    _heap_frozen = True


# ---------------------------------------------------------------------- global filters


def cap_hash(uids: pa.Array | pa.ChunkedArray | list[str], seed: int) -> np.ndarray:
    """Seeded 64-bit hash of each uid (32 hex digits): the sampling order of the per-class cap.

    The uid is already a uniform BLAKE2b digest, so its first 64 bits mixed with the seed by
    splitmix64 give an independent pseudo-random order per seed, vectorised. Raises
    ``ValueError`` for anything but 32 lower-case hex digits.
    """
    if isinstance(uids, list):
        uids = pa.array(uids, pa.string())
    return _cap_hash_words(_uid_words(uids)[0], seed)


def _cap_hash_words(uid_hi: np.ndarray, seed: int) -> np.ndarray:
    """:func:`cap_hash` from the high word of each uid (its first 16 hex digits)."""
    return _splitmix64(uid_hi ^ _splitmix64(np.array([seed % 2**64], dtype=np.uint64))[0])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


# Keys of a match, for the global filters: its uid and a MurmurHash3-128 digest of its URL (a
# well-mixed 128-bit value tells URLs apart; it need not be cryptographic, and costs a seventh
# of BLAKE2b), each as two uint64 words, and its label. Scan tasks write them packed (37 bytes
# a match) beside their parts, so the driver neither re-reads the parts nor hashes strings.
KEY_DTYPE = np.dtype(
    [
        ("uid_hi", "<u8"),
        ("uid_lo", "<u8"),
        ("url_hi", "<u8"),
        ("url_lo", "<u8"),
        ("label", "<i4"),
        ("has_url", "u1"),
    ]
)


def match_keys(table: pa.Table, uid_digests: np.ndarray | None = None) -> np.ndarray:
    """:data:`KEY_DTYPE` records of a table with ``uid``, ``url`` and ``label`` columns.

    ``uid_digests`` (``uint8 [rows, 16]``, the bytes the uids are the hex of) saves parsing
    the uid column.
    """
    keys = np.zeros(table.num_rows, dtype=KEY_DTYPE)
    if not table.num_rows:
        return keys
    if uid_digests is None:
        keys["uid_hi"], keys["uid_lo"] = _uid_words(table.column("uid"))
    else:
        words = uid_digests.view(">u8")  # big-endian: the words order as the hex strings do
        keys["uid_hi"], keys["uid_lo"] = words[:, 0], words[:, 1]
    keys["label"] = table.column("label").to_numpy()
    url = table.column("url").combine_chunks()
    keys["has_url"] = np.asarray(url.is_valid().to_numpy(zero_copy_only=False), dtype=np.uint8)
    words = murmur3_128(url)
    keys["url_hi"], keys["url_lo"] = words[:, 0], words[:, 1]
    return keys


def global_keep(keys: pa.Table, cfg: TextFilterConfig) -> tuple[pa.Table, Counter]:
    """Which matches survive the global filters; returns ``(kept uid/label/part, drop counts)``.

    ``keys`` holds ``uid``, ``url``, ``label`` and ``part`` (scan part index) of every match.
    See :func:`global_keep_keys`, which this wraps.
    """
    part = keys.column("part").to_numpy().astype(np.int64)
    idx, counts = global_keep_keys(match_keys(keys), part, cfg)
    return keys.select(["uid", "label", "part"]).take(pa.array(idx, pa.int64())), counts


def global_keep_keys(
    keys: np.ndarray, part: np.ndarray, cfg: TextFilterConfig
) -> tuple[np.ndarray, Counter]:
    """Which matches survive the global filters: ``(ascending indices into keys, drop counts)``.

    ``keys`` are :data:`KEY_DTYPE` records and ``part`` the scan part of each. A (uid, label)
    found in several parts (the same row in two input files) is kept once, in its lowest part.
    De-duplication keeps, per URL, the rows of the smallest uid (all its labels when ambiguous
    rows are kept; rows without a URL are dropped); the cap keeps per class the
    ``max_per_class`` rows of smallest :func:`cap_hash` (ties by uid).

    All numpy sorts over integers: the uid's words order uids as their strings do, and URLs are
    told apart by a 128-bit digest, as rows are by their 128-bit uid. (Arrow's string
    ``group_by`` and ``join`` took most of a second per million matches.)
    """
    counts: Counter = Counter()
    n = len(keys)
    # Views of the packed records' fields: the sort reads its first key once; the others are
    # read only for its rare ties.
    hi, lo, url_hi, url_lo, label = (
        keys[f] for f in ("uid_hi", "uid_lo", "url_hi", "url_lo", "label")
    )
    if cfg.dedup_urls:
        # One sort by (URL, uid, label, part): a uid fixes its URL, so the repeats of a
        # (uid, label) are neighbours (the first in its lowest part), and each URL's run starts
        # with its smallest uid.
        order = _sort_keys(url_hi, url_lo, hi, lo, label, part)
    else:
        order = _sort_keys(hi, lo, label, part)  # (uid, label, part)
    kept = np.zeros(n, dtype=bool)  # ascending indices: a mask, cheaper than sorting them
    kernels = _kernels()
    if kernels is None:
        # Contiguous columns: the packed records' fields are unaligned, slow to gather from.
        dup_rows, dup_urls = _sorted_keep_numpy(
            order,
            *(np.ascontiguousarray(c) for c in (hi, lo, label, url_hi, url_lo)),
            keys["has_url"].astype(bool),
            cfg.dedup_urls,
            kept,
        )
    else:  # one pass instead of a dozen gathers and compares over all matches: a tenth
        dup_rows, dup_urls = kernels.sorted_keep(order, keys, cfg.dedup_urls, kept)
    counts["dropped_duplicate_row"] += int(dup_rows)
    if cfg.dedup_urls:
        counts["dropped_duplicate_url"] += int(dup_urls)
    order = np.flatnonzero(kept)
    if cfg.max_per_class and len(order):
        keep = _class_cap(hi[order], lo[order], label[order], cfg.max_per_class, cfg.seed)
        counts["dropped_over_class_cap"] += int((~keep).sum())
        order = order[keep]
    return order, counts


def _class_cap(
    hi: np.ndarray, lo: np.ndarray, label: np.ndarray, max_per_class: int, seed: int
) -> np.ndarray:
    """The per-class cap over distinct (uid, label) rows: True for the ``max_per_class`` rows
    of each label with the smallest :func:`cap_hash` (ties by uid). The rows kept from a union
    are those kept from the union of what each part keeps, so the cap can run bucket by
    bucket over a running set of candidates."""
    lb = label.astype(np.int64)
    cap = _cap_hash_words(hi, seed)
    # By (label, hash, uid): sorted by hash (ties by uid, as their strings order), then a
    # stable sort by label; cheaper than np.lexsort over the four.
    rank_order = _sort_keys(cap, hi, lo)
    rank_order = rank_order[np.argsort(lb[rank_order], kind="stable")]
    lab_sorted = lb[rank_order]
    starts = np.r_[0, np.flatnonzero(lab_sorted[1:] != lab_sorted[:-1]) + 1]
    rank = np.arange(len(rank_order)) - np.repeat(starts, np.diff(np.r_[starts, len(rank_order)]))
    keep = np.zeros(len(rank_order), dtype=bool)
    keep[rank_order[rank < max_per_class]] = True
    return keep


def _sorted_keep_numpy(order, hi, lo, label, url_hi, url_lo, has_url, dedup_urls, kept):
    """:func:`pipeline.text_filter.kernels.sorted_keep` in numpy (where numba is missing): marks ``kept``,
    returns (repeated rows, rows dropped by URL)."""
    n = len(order)
    h, lw, lb = hi[order], lo[order], label[order]
    first = _first_of_runs(h, lw, lb)
    dup_rows, dup_urls = n - int(first.sum()), 0
    if dedup_urls and n:
        u_hi, u_lo = url_hi[order], url_lo[order]
        starts = np.ones(n, dtype=bool)
        starts[1:] = (u_hi[1:] != u_hi[:-1]) | (u_lo[1:] != u_lo[:-1])
        run_first = np.flatnonzero(starts)[np.cumsum(starts) - 1]
        best = (h == h[run_first]) & (lw == lw[run_first]) & has_url[order]
        dup_urls = int((first & ~best).sum())
        first &= best
    kept[order[first]] = True
    return dup_rows, dup_urls


def _first_of_runs(*sorted_keys: np.ndarray) -> np.ndarray:
    """For rows sorted by ``sorted_keys``: True where a row differs from the one before it in
    any of them (the first of each run of equal keys)."""
    first = np.zeros(len(sorted_keys[0]), dtype=bool)
    first[:1] = True
    for k in sorted_keys:
        first[1:] |= k[1:] != k[:-1]
    return first


def _uid_words(uids: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The 128-bit value of each uid (32 lower-case hex digits) as (high, low) uint64 words;
    their order is the uids' string order. Raises ``ValueError`` for any other uid."""
    arr = uids.combine_chunks() if isinstance(uids, pa.ChunkedArray) else uids
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    if arr.null_count or not pa.types.is_string(arr.type):
        raise ValueError("uids must be 32 hex digits")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + n + 1]
    if not (np.diff(offsets) == 32).all():
        raise ValueError("uids must be 32 hex digits")
    digits = arr.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0])).to_pybytes()
    # Lower case only (binascii takes upper case too, whose string order differs).
    if digits.translate(None, b"0123456789abcdef"):
        raise ValueError("uids must be 32 hex digits")
    # The 16 bytes of each uid, big-endian.
    words = np.frombuffer(binascii.unhexlify(digits), dtype=">u8").reshape(n, 2)
    return words[:, 0].astype(np.uint64), words[:, 1].astype(np.uint64)


def _sort_keys(first: np.ndarray, *rest: np.ndarray) -> np.ndarray:
    """The order sorting rows by ``first``, then each of ``rest`` (rows equal in all of them by
    row number). One sort of ``first`` (a uint64 word of a uid or URL digest, or another
    hash); only the rows that share its high bits (the same uid or URL, found in two files or
    under two labels, and the rare near-equal hashes) are sorted by the other keys: a small
    part of the cost of ``np.lexsort`` over them all."""
    n = len(first)
    bits = max(1, (n - 1).bit_length())
    if bits > 40:  # too many rows to leave the key its high bits: a plain argsort
        order = np.argsort(first)
        f = first[order]
    else:
        # A value sort of (the key's high bits | row number): numpy's SIMD sort, a seventh of
        # argsort's time on a million keys. Rows whose keys share those high bits are ties,
        # sorted by the whole keys below (the keys here are hashes: ties are the repeated keys
        # themselves, and near-equal hashes only rarely).
        mask = np.uint64((1 << bits) - 1)
        packed = np.sort(
            (first.astype(np.uint64, copy=False) & ~mask) | np.arange(n, dtype=np.uint64)
        )
        order = (packed & mask).astype(np.int64)
        f = packed >> np.uint64(bits)
    tie = np.zeros(len(f), dtype=bool)
    tie[1:] = f[1:] == f[:-1]
    tie[:-1] |= tie[1:].copy()
    if tie.any():
        pos = np.flatnonzero(tie)  # runs of equal words: contiguous, in order
        order[pos] = _sort_ties(order[pos], (first, *rest))
    return order


def _sort_ties(rows: np.ndarray, keys: tuple[np.ndarray, ...]) -> np.ndarray:
    """``rows`` (in row order within each run of equal ``keys[0]``) sorted by all of ``keys``,
    rows equal in every key kept in that order. By the first three keys, then, only for the
    rows still equal in those (a row found twice), by the rest: rows that share a URL but not
    a uid, the common tie, cost three gathers and key passes of np.lexsort, not one per key
    (URL de-duplication of 1.45M matches, most URLs shared: 1.1 s, against 1.8 s with one
    np.lexsort over all six keys)."""
    head = [k[rows] for k in keys[:3]]
    o = np.lexsort(head[::-1])
    rows = rows[o]
    if len(keys) <= 3 or len(rows) < 2:
        return rows
    same = np.ones(len(rows) - 1, dtype=bool)
    while head:  # each key dropped once compared: the rows below are sorted with less held
        h = head.pop()[o]
        same &= h[1:] == h[:-1]
    del h, o
    if not same.any():
        return rows
    tied = np.zeros(len(rows), dtype=bool)
    tied[1:] = same
    tied[:-1] |= same
    p = np.flatnonzero(tied)
    group = np.cumsum(np.r_[True, ~same])[p]  # runs equal in the first three keys
    sub = rows[p]
    rows[p] = sub[np.lexsort((*(k[sub] for k in reversed(keys[3:])), group))]
    return rows


_HEX_PAIRS = np.frombuffer(b"".join(b"%02x" % i for i in range(256)), dtype=np.uint16)


def _scan_listing(out: str) -> dict[str, int]:
    """The files of the scan directory, name -> size in bytes, from one fresh listing (empty
    where the directory does not exist)."""
    scan = io.join(out, SCAN_DIR)
    if not io.exists(scan):
        return {}
    fs, path = io.url_to_fs(scan)
    fs.invalidate_cache(path)
    listed = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["size"] for e in fs.ls(path, detail=True)}
    # Object-store filesystems cache the listing; the files written next must not be hidden.
    fs.invalidate_cache(path)
    return listed


def _scanned_indices(out: str, indices: list[int]) -> set[int]:
    """Those of ``indices`` whose scan is complete (the stats file of :func:`_piece_paths`
    exists, as :func:`scan_file` checks), from one listing of the scan directory."""
    names = _scan_listing(out)
    return {i for i in indices if _piece_paths(out, i)[1].rsplit("/", 1)[-1] in names}


def _read_keys(
    out: str, indices: list[int], counts: list[int] | None = None
) -> tuple[np.ndarray, list[int]]:
    """The keys files of scan parts ``indices``, read in that order into one array of
    :data:`KEY_DTYPE` records; and the number of records of each. ``counts``: the numbers
    their stats recorded; a file of another size is refused.

    The files are read straight into the array (sizes from one listing of the scan directory):
    the driver holds the keys once (reading them as bytes and joining held them twice, and
    np.concatenate of packed records copies field by field, 7x slower than bytes).
    """
    if not indices:
        return np.zeros(0, dtype=KEY_DTYPE), []
    sizes = _keys_sizes(out, indices, counts)
    buf = np.empty(sum(sizes), dtype=np.uint8)
    view, pos = memoryview(buf), 0
    for url, n, f in _open_keys(out, indices, sizes):
        with f:
            _read_exactly(f, view[pos : pos + n], url)
        pos += n
    return buf.view(KEY_DTYPE), [n // KEY_DTYPE.itemsize for n in sizes]


def _keys_sizes(out: str, indices: list[int], counts: list[int] | None) -> list[int]:
    """The byte sizes of the keys files of scan parts ``indices``, from one listing; a missing
    file, or one whose size is not a whole number of records (of ``counts[k]`` records, where
    given), is refused."""
    listed = _scan_listing(out)
    sizes = []
    for k, i in enumerate(indices):
        name = _keys_path(out, i).rsplit("/", 1)[-1]
        n = listed.get(name)
        count = None if counts is None else counts[k]
        if (
            n is None
            or n % KEY_DTYPE.itemsize
            or (count is not None and n != count * KEY_DTYPE.itemsize)
        ):
            raise RuntimeError(
                f"text filter: {io.join(out, SCAN_DIR, name)} missing or truncated"
                + ("" if count is None or n is None else f" ({n} bytes, {count} matches)")
            )
        sizes.append(int(n))
    return sizes


def _open_keys(out: str, indices: list[int], sizes: list[int]):
    """``(URL, byte size, open file)`` of each keys file, opened one at a time as iterated."""
    fs, scan = io.url_to_fs(io.join(out, SCAN_DIR))
    for i, n in zip(indices, sizes):
        url = _keys_path(out, i)
        yield url, n, fs.open(f"{scan.rstrip('/')}/{url.rsplit('/', 1)[-1]}", "rb")


def _read_exactly(f, view: memoryview, url: str) -> None:
    if f.readinto(view) != len(view):
        raise RuntimeError(f"text filter: {url} changed while read")


def _read_keys_bucket(
    out: str, indices: list[int], sizes: list[int], bucket: int, buckets: int
) -> tuple[np.ndarray, np.ndarray]:
    """The records of URL bucket ``bucket`` of ``buckets`` (a power of two: the top bits of
    ``url_hi``) from the keys files of ``indices`` (byte ``sizes``, from :func:`_keys_sizes`),
    and the index of each among all their records (in file order, as :func:`_read_keys`
    reads them). Files are read in chunks of up to a million records (about a bucket's share):
    only the bucket is held."""
    shift = np.uint64(64 - (buckets.bit_length() - 1))
    share = sum(sizes) // KEY_DTYPE.itemsize // buckets
    chunk = np.empty(min(1 << 20, max(1 << 14, share)) * KEY_DTYPE.itemsize, dtype=np.uint8)
    view = memoryview(chunk)
    found, where = [], []
    first = 0  # index of the file's first record among all
    for url, size, f in _open_keys(out, indices, sizes):
        with f:
            for pos in range(0, size, len(chunk)):
                n = min(len(chunk), size - pos)
                _read_exactly(f, view[:n], url)
                records = chunk[:n].view(KEY_DTYPE)
                sel = np.flatnonzero((records["url_hi"] >> shift) == bucket)
                found.append(records[sel])
                where.append(first + pos // KEY_DTYPE.itemsize + sel)
        first += size // KEY_DTYPE.itemsize
    if not found:
        return np.zeros(0, dtype=KEY_DTYPE), np.zeros(0, dtype=np.int64)
    return np.concatenate(found), np.concatenate(where).astype(np.int64)


# Peak bytes the global filters hold per match of a bucket: the records, their parts, the sort
# and its temporaries. Measured with tracemalloc at 1.45M matches (bench/global_filters.py):
# 70-80 where few rows share a URL, up to 121 where most do (the rows tied on the sort's first
# key are sorted again); rounded up, with room to spare.
GLOBAL_BYTES_PER_MATCH = 136


def global_buckets(matches: int, memory_mb: int) -> int:
    """How many URL buckets the global filters take ``matches`` in, so that one bucket's work
    (:data:`GLOBAL_BYTES_PER_MATCH` a match) fits in ``memory_mb``: a power of two, 1 where it
    fits at once or ``memory_mb`` is 0. Beside a bucket, the driver holds a byte per match."""
    if memory_mb <= 0 or matches <= 0:
        return 1
    need = -(-matches * GLOBAL_BYTES_PER_MATCH // (memory_mb << 20))
    return 1 << max(0, need - 1).bit_length()


def global_pass(
    out: str, done: list[int], matched: list[int], cfg: TextFilterConfig, num_classes: int
) -> tuple[np.ndarray, Counter, np.ndarray, int]:
    """The global filters over the keys of scan parts ``done`` (``matched`` records each):
    ``(kept mask over all their records in order, drop counts, kept rows per class, buckets)``.

    Where the matches need more than ``cfg.global_memory_mb`` (:func:`global_buckets`), they
    are filtered one URL bucket at a time (the keys files read once per bucket): a URL's rows
    are all in its bucket, and so are a row's repeats (a uid names one URL), so each bucket's
    de-duplication is exact; the cap keeps a running top ``max_per_class`` per class. The
    result equals one pass over all (the same rows, the same counts).
    """
    n = sum(matched)
    buckets = global_buckets(n, cfg.global_memory_mb)
    done_arr = np.asarray(done, dtype=np.int64)
    starts = np.cumsum([0, *matched])[:-1]
    kept = np.zeros(n, dtype=bool)
    per_class = np.zeros(num_classes, dtype=np.int64)
    counts: Counter = Counter()
    uncapped = replace(cfg, max_per_class=0)
    # The cap's candidates: uid words, label and index of the best rows of each class so far.
    cand = [np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int32)]
    cand_idx = np.zeros(0, dtype=np.int64)
    survivors = 0
    sizes = None
    if buckets > 1:
        sizes = _keys_sizes(out, done, matched)  # checked once, for every bucket's reads
        (log.warning if buckets > 256 else log.info)(
            "text filter: %d matches in %d URL buckets (filter.global_memory_mb=%d); the keys "
            "are read once per bucket",
            n, buckets, cfg.global_memory_mb,
        )  # fmt: skip
    from tqdm import tqdm

    bar = tqdm(range(buckets), desc="global filters", unit="bucket", disable=buckets == 1 or None)
    for b in bar:
        if buckets == 1:
            keys, _ = _read_keys(out, done, matched)
            where = None
            part_of = np.repeat(done_arr, matched)
        else:
            keys, where = _read_keys_bucket(out, done, sizes, b, buckets)
            part_of = done_arr[np.searchsorted(starts, where, side="right") - 1]
        idx, c = global_keep_keys(keys, part_of, uncapped)
        counts.update(c)
        rows = idx if where is None else where[idx]
        if cfg.max_per_class:
            survivors += len(idx)
            fields = ("uid_hi", "uid_lo", "label")
            cand = [np.concatenate([a, keys[f][idx]]) for a, f in zip(cand, fields)]
            cand_idx = np.concatenate([cand_idx, rows])
            if len(cand_idx):
                keep = _class_cap(*cand, cfg.max_per_class, cfg.seed)
                cand, cand_idx = [a[keep] for a in cand], cand_idx[keep]
        else:
            kept[rows] = True
            per_class += np.bincount(keys["label"][idx], minlength=num_classes)
        del keys, where, part_of, idx, rows
    if cfg.max_per_class:
        kept[cand_idx] = True
        per_class = np.bincount(cand[2], minlength=num_classes).astype(np.int64)
        counts["dropped_over_class_cap"] += survivors - len(cand_idx)
    return kept, counts, per_class, buckets


def _keep_path(out: str, index: int) -> str:
    return io.join(out, SCAN_DIR, f"keep-{index:05d}.rows")


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


# ---------------------------------------------------------------------- driver


def check_inputs(
    files: list[str], cfg: TextFilterConfig
) -> tuple[list[str], dict[str, str], dict[str, list[int]]]:
    """Read every file's footer; returns (readable files, bad files -> reason, readable files ->
    the row count of each of their row groups).

    A missing required column always raises; an unreadable footer raises unless
    ``skip_bad_files``. Footers are read by a thread pool (thousands of files on an object
    store took minutes one at a time); errors are reported in file order, as one at a time.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

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
        footers = list(
            tqdm(pool.map(footer, files), total=len(files), desc="check footers", disable=None)
        )
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

    Spark spends 0.03-0.05 s between one task and the next on a worker here (0.12-0.23 s
    before :func:`_freeze_worker_heap`; seconds where a task lands on a cold worker), so a
    task per small file wastes a share of the time. No group holds more than an even share of
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


def run_text_filter(
    cfg: TextFilterConfig,
    dataset: str,
    metadata: str,
    out: str,
    master: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Run stage 1; returns the stats dict (also written to ``<out>/_stats.json``).

    Raises :class:`pipeline.core.io.InputError` for a missing input, a missing column or (without
    ``skip_bad_files``) an unreadable file, naming the file. A failed run leaves no
    ``_SUCCESS``; the rerun reuses finished scan units when the files, classes and settings
    are unchanged (and rescans everything otherwise).
    """
    if not io.prepare_output(out, overwrite):
        return io.read_json(io.join(out, STATS))
    t0 = time.perf_counter()
    spec = load_dataset(dataset, descriptions=False)
    files = io.list_files(metadata, suffixes=(".parquet",))
    _, bad, row_groups = check_inputs(files, cfg)  # row_groups: the readable files
    # Units follow the sorted input list and the footers, so part names are stable across
    # reruns (the fingerprint below holds them).
    todo, unit_rows = plan_units(files, row_groups, cfg.split_rows)
    log.info(
        "text filter: %d files (%d unreadable) in %d scan units, %d classes -> %s",
        len(files),
        len(bad),
        len(todo),
        spec.num_classes,
        out,
    )
    classes, synonyms = list(spec.classes), {k: list(v) for k, v in spec.synonyms.items()}
    _check_scan_fingerprint(
        out,
        {
            # task_rows only regroups the work, and split_rows acts through the units: a rerun
            # with others that cut the files the same way reuses the scans. global_memory_mb
            # changes only how the driver works (a rerun after it ran out of memory, with a
            # smaller budget, reuses them too).
            "config": {
                k: v
                for k, v in to_dict(cfg).items()
                if k not in ("task_rows", "split_rows", "global_memory_mb")
            },
            "classes": classes,
            "synonyms": synonyms,
            "files": files,
            "units": [list(u) for u in todo],
            "scan_format": SCAN_FORMAT,
        },
    )
    from pipeline.core.spark import JobProgress, get_spark

    spark = get_spark(master, app_name=f"primer-filter-{spec.name}")
    sc = spark.sparkContext
    # Units a failed run already scanned (their stats marker exists) cost nothing: grouped by
    # the rows still to scan only.
    scanned = _scanned_indices(out, [u.index for u in todo])
    pending = {u.index: unit_rows[u.index] for u in todo if u.index not in scanned}
    groups = task_groups(todo, pending, cfg.task_rows, sc.defaultParallelism)
    t_scan = time.perf_counter()
    try:
        # One task per group; results come back in input order (groups are consecutive).
        with JobProgress(sc, "scan", len(groups)):
            results = (
                sc.parallelize(groups, max(1, len(groups)))
                .flatMap(lambda g: scan_files(g, out, cfg, classes, synonyms))
                .collect()
            )
    except Exception as e:
        raise io.InputError(_spark_error_message(e)) from None
    scan_s = time.perf_counter() - t_scan
    for r in results:
        if "bad_file" in r:
            bad.setdefault(r["file"], r["bad_file"])
    # A file with an unreadable piece is left out whole, as when it is one unit: none of its
    # pieces' rows count or reach the output.
    good_results = [(u, r) for u, r in zip(todo, results) if u.url not in bad]
    done = [u.index for u, _ in good_results]
    counts: Counter = Counter()
    timings: Counter = Counter()
    for _, r in good_results:
        counts.update(r.get("counts", {}))
    for r in results:
        timings.update(r.get("timings", {}))
    # Global filters over the keys of all matches (driver, numpy). A part that loses no rows
    # is already final (deduplicated): it is linked or copied into place. Only parts
    # that lose rows are rewritten, by Spark tasks.
    from tqdm import tqdm

    t_global = time.perf_counter()
    matched = [int(r["counts"]["rows_matched"]) for _, r in good_results]
    kept, gcounts, final_per_class, buckets = global_pass(out, done, matched, cfg, spec.num_classes)
    counts.update(gcounts)
    # The mask runs over the parts' records in order: a part's slice of it marks its rows.
    rewrite = []
    part_rows = dict(zip(done, matched))
    first = 0
    for i, m in tqdm(list(zip(done, matched)), desc="place parts", unit="part", disable=None):
        rows = np.flatnonzero(kept[first : first + m]).astype("<i8")
        first += m
        if len(rows) == m:
            _publish_part(i, out)
        else:
            io.write_bytes(_keep_path(out, i), rows.tobytes())
            rewrite.append(i)
    total_kept = int(kept.sum())
    del kept
    if rewrite:
        with JobProgress(sc, "rewrite parts", len(rewrite), unit="part"):
            rewritten = (
                sc.parallelize(rewrite, len(rewrite)).map(lambda i: finalize_part(i, out)).collect()
            )
        if sum(rewritten) != total_kept - sum(part_rows[i] for i in done if i not in rewrite):
            raise RuntimeError("text filter: rewritten parts disagree with the kept keys")
    global_s = time.perf_counter() - t_global
    stats = {
        "dataset": spec.name,
        "files": len(files),
        "scan_units": len(todo),
        "scan_tasks": len(groups),
        "global_buckets": buckets,
        "bad_files": bad,
        "rows_scanned": int(counts.get("rows_scanned", 0)),
        "rows_matched_before_global_filters": int(counts.get("rows_matched", 0)),
        "rows_matched": int(total_kept),
        "dropped": {
            k[len("dropped_") :]: int(v)
            for k, v in sorted(counts.items())
            if k.startswith("dropped_")
        },
        "per_class": {spec.classes[c]: int(final_per_class[c]) for c in range(spec.num_classes)},
        "empty_classes": [
            spec.classes[c] for c in range(spec.num_classes) if not final_per_class[c]
        ],
        "timings": {
            "scan_wall_s": round(scan_s, 3),
            "global_s": round(global_s, 3),
            "total_s": round(time.perf_counter() - t0, 3),
            "task_read_s": round(timings.get("read_s", 0.0), 3),
            "task_match_s": round(timings.get("match_s", 0.0), 3),
            "task_write_s": round(timings.get("write_s", 0.0), 3),
            # fsync and rename (or upload) of the parts and keys, beside the scanning.
            "task_publish_s": round(timings.get("publish_s", 0.0), 3),
            # Summed over scan units, and the slowest unit (the scan's wall time cannot beat it).
            "task_total_s": round(timings.get("total_s", 0.0), 3),
            "task_max_s": round(
                max((r.get("timings", {}).get("total_s", 0.0) for r in results), default=0.0), 3
            ),
        },
    }
    io.write_json(io.join(out, CONFIG), {"dataset": dataset, "metadata": metadata, **to_dict(cfg)})
    io.write_json(io.join(out, STATS), stats)
    io.mark_done(out, {"rows": stats["rows_matched"]})
    io.remove(io.join(out, SCAN_DIR))
    log.info(
        "text filter: %d rows scanned, %d matched (%s) in %.1f s",
        stats["rows_scanned"], stats["rows_matched"], stats["dropped"], stats["timings"]["total_s"],
    )  # fmt: skip
    return stats


def _check_scan_fingerprint(out: str, inputs: dict) -> None:
    """Reuse the scan parts of a failed run only when they came from the same inputs.

    A rerun with other files, classes or settings must not mix in stale parts: the scan
    directory is cleared when its recorded fingerprint differs.
    """
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    url = io.join(out, SCAN_DIR, "_inputs.json")
    if io.exists(url):
        if io.read_json(url).get("sha256") == digest:
            log.info("resuming: reusing finished scans in %s", io.join(out, SCAN_DIR))
            return
        log.warning("inputs or settings changed since the failed run; rescanning everything")
    io.remove(io.join(out, SCAN_DIR))
    io.write_json(url, {"sha256": digest})


def _spark_error_message(e: Exception) -> str:
    """The Python error inside a failed Spark task, without the JVM stack."""
    text = str(e)
    for marker in ("pipeline.core.io.InputError: ", "InputError: "):
        if marker in text:
            return text.split(marker, 1)[1].splitlines()[0]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return f"text filter failed: {lines[-1] if lines else text}"


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "filter",
        parents=[common],
        help="stage 1: keep LAION rows whose captions name a class (Spark)",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(p)
    p.set_defaults(func=cmd_filter)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="bundled dataset name or path.yaml")
    p.add_argument(
        "--metadata", required=True, help="parquet file, directory, glob or URL (s3://, hf://, ...)"
    )
    p.add_argument("--out", required=True, help="output directory URL")
    p.add_argument("--master", help="Spark master when no session is active (default local[*])")
    p.add_argument("--overwrite", action="store_true", help="redo a complete output")


def cmd_filter(args: argparse.Namespace) -> int:
    cfg = stage_config(TextFilterConfig, "filter", args.config, args.overrides)
    stats = run_text_filter(cfg, args.dataset, args.metadata, args.out, args.master, args.overwrite)
    sys.stdout.write(
        f"{stats['rows_matched']} matches of {stats['rows_scanned']} rows -> {args.out}\n"
    )
    return 0
