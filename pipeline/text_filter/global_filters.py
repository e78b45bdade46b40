"""The global filters, on the driver, in numpy over the keys every scan task wrote (uid and URL
digest words and the label, 37 bytes a match): a row found in several input files is kept
once; URL de-duplication keeps the row of the smallest uid of each URL; the per-class cap keeps
the ``max_per_class`` rows with the smallest seeded hash of their uid (a pseudo-random sample,
not the first rows in file order). Where the matches need more than ``global_memory_mb``,
they are filtered one URL bucket at a time, with the same result.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow as pa

from pipeline.core import io
from pipeline.text_filter.batch import KEY_DTYPE, match_keys
from pipeline.text_filter.config import SCAN_DIR, TextFilterConfig
from pipeline.text_filter.hashing import _cap_hash_words, _kernels
from pipeline.text_filter.parts import (
    _keys_path,
    _scan_listing,
)

log = logging.getLogger(__name__)


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
    ``group_by`` and ``join`` were far slower.)
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
    (faster than one np.lexsort over all six keys where most URLs are shared)."""
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


def _read_keys(
    out: str, indices: list[int], counts: list[int] | None = None
) -> tuple[np.ndarray, list[int]]:
    """The keys files of scan parts ``indices``, read in that order into one array of
    :data:`KEY_DTYPE` records; and the number of records of each. ``counts``: the numbers
    their stats recorded; a file of another size is refused.

    The files are read straight into the array (sizes from one listing of the scan directory):
    the driver holds the keys once (reading them as bytes and joining held them twice, and
    np.concatenate of packed records copies field by field, far slower than bytes).
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
# and its temporaries: the peak bench/global_filters.py measures (higher where most rows share a
# URL, since the rows tied on the sort's first key are sorted again), rounded up with room to
# spare (docs/benchmarks.md).
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
    from pipeline.core.progress import progress

    bar = progress(range(buckets), desc="global filters", unit="bucket", disable=buckets == 1)
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
