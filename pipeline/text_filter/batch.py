"""The text filter's pure core: one Arrow record batch of LAION rows in, its kept matches out.

Columns are resolved from the file's schema (:func:`resolve_columns`), captions matched
(:mod:`pipeline.text_filter.matcher`), the row-local filters applied (size, safety,
similarity, caption length), and every dropped row counted by reason. :func:`match_keys` gives
the integer keys the global filters sort.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import io
from pipeline.text_filter.config import OPTIONAL_TYPES, REQUIRED, TextFilterConfig
from pipeline.text_filter.hashing import (
    _has_control_bytes,
    _hex_strings,
    _uid_digests,
    _uid_words,
    murmur3_128,
)
from pipeline.text_filter.resolve import AMBIGUOUS, CONTRADICTED, EXCLUDED_ROW, NONE


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


def filter_batch(
    batch: pa.RecordBatch,
    cols: dict[str, str],
    matcher,
    cfg: TextFilterConfig,
    classes: list[str],
    stats: Counter,
    source_file: str | None = None,
    first_row: int = 0,
) -> pa.Table:
    """The pure core: one record batch in, its kept matches out (canonical columns).

    Each match records where it came from: ``source_file`` (null when None) and
    ``source_row``, its row in that file (``first_row`` is the batch's first row there).

    Counts every row into ``stats`` by outcome: ``rows_scanned``, drops by reason
    (``null_or_empty_caption``, ``caption_too_long``, ``no_match``, ``excluded``,
    ``contradicted``, ``ambiguous``, then for matches ``null_or_empty_url``,
    ``url_with_control_character``, ``too_small``, ``unsafe``, ``low_similarity``),
    ``rows_matched`` and ``rows_family`` (matches kept with several candidate classes); and
    per class (keys ``<prefix><label>``, see :data:`PER_CLASS`) the rows excluded or
    contradicted and the family rows that list it.

    The ``candidates`` column lists each row's candidate classes: the label alone, or for a
    family row (a caption naming a family of classes, not which member) all of them, the
    label being the smallest.
    """
    return _filter_batch(batch, cols, matcher, cfg, classes, stats, source_file, first_row)[0]


def _filter_batch(
    batch: pa.RecordBatch,
    cols: dict[str, str],
    matcher,
    cfg: TextFilterConfig,
    classes: list[str],
    stats: Counter,
    source_file: str | None = None,
    first_row: int = 0,
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
    stats["dropped_no_match"] += int(((label == NONE) & usable).sum())
    stats["dropped_excluded"] += int((label == EXCLUDED_ROW).sum())
    stats["dropped_contradicted"] += int((label == CONTRADICTED).sum())
    for code, prefix in (
        (EXCLUDED_ROW, PER_CLASS["excluded"]),
        (CONTRADICTED, PER_CLASS["contradicted"]),
    ):
        lab = result.out_label[label[result.out_row] == code]
        _count_classes(stats, prefix, lab)
    single = np.flatnonzero(label >= 0)
    rows, labs, terms = single, label[single], result.term[single]
    # Candidate lists (CSR): a row's list is cands[c_off[cid]:c_off[cid + 1]]; cid -1: [label].
    c_rows, c_start = np.unique(result.cand_row, return_index=True)
    cid = np.full(len(label), -1, dtype=np.int64)
    cid[c_rows] = np.arange(len(c_rows))
    cid = cid[single]
    c_off = np.r_[c_start, len(result.cand_row)].astype(np.int64)
    cands = result.cand_label
    if cfg.keep_ambiguous:
        # An ambiguous row once under each class it names; rows stay in file order.
        e_ids, e_start = np.unique(result.amb_cand_entry, return_index=True)
        e_cid = np.full(len(result.amb_row), -1, dtype=np.int64)
        e_cid[e_ids] = len(c_rows) + np.arange(len(e_ids))
        c_off = np.r_[
            c_start, len(result.cand_row) + e_start, len(cands) + len(result.amb_cand_label)
        ]
        c_off = c_off.astype(np.int64)
        cands = np.concatenate([cands, result.amb_cand_label])
        rows = np.concatenate([rows, result.amb_row])
        labs = np.concatenate([labs, result.amb_label])
        terms = np.concatenate([terms, result.amb_term])
        cid = np.concatenate([cid, e_cid])
        order = np.lexsort((labs, rows))
        rows, labs, terms, cid = rows[order], labs[order], terms[order], cid[order]
    else:
        stats["dropped_ambiguous"] += int((label == AMBIGUOUS).sum())
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
        rows, labs, terms, cid = rows[k], labs[k], terms[k], cid[k]
        extra = {c: v.take(pa.array(k)) for c, v in extra.items()}
        url_sel = url_sel.take(pa.array(k))
    url_sel = _as_string(url_sel)
    cap_sel = _as_string(captions.take(pa.array(rows)))
    labels = pa.array(labs.astype(np.int32))
    uid_digests = _uid_digests(url_sel, cap_sel)  # after the filters: hashing is per kept row
    candidates, family_labels = _candidates(labs, cid, c_off, cands)
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
            "candidates": candidates,
            # Where the row is: precomputed embeddings aligned with the file are read by row.
            "source_file": pa.repeat(pa.scalar(source_file, pa.string()), len(rows)),
            "source_row": pa.array(rows.astype(np.int64) + first_row, pa.int64()),
            **extra,
        }
    )
    stats["rows_matched"] += table.num_rows
    family = cid >= 0
    stats["rows_family"] += int(family.sum())
    if family.any():
        _count_classes(stats, PER_CLASS["family"], family_labels)
    return table, uid_digests


# Per-class counts in a batch's stats: key prefix + class index.
PER_CLASS = {k: f"per_class_{k}/" for k in ("excluded", "contradicted", "family")}


def split_per_class(stats: Counter) -> tuple[dict, dict]:
    """A scan unit's stats as ``(counts, {"per_class_<what>": {label: rows}})``."""
    counts: dict = {}
    per: dict = {f"per_class_{k}": {} for k in PER_CLASS}
    for key, value in stats.items():
        prefix, _, label = key.partition("/")
        if label and prefix in per:
            per[prefix][label] = int(value)
        else:
            counts[key] = value
    return counts, per


def _count_classes(stats: Counter, prefix: str, labels: np.ndarray) -> None:
    if len(labels):
        values, counts = np.unique(labels, return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            stats[f"{prefix}{v}"] += c


def _candidates(
    labs: np.ndarray, cid: np.ndarray, c_off: np.ndarray, cands: np.ndarray
) -> tuple[pa.Array, np.ndarray]:
    """The ``candidates`` column (``[label]``, or for a family row, ``cid`` >= 0, its list
    ``cands[c_off[cid]:c_off[cid + 1]]``), and the candidates of the family rows."""
    fam = cid >= 0
    lengths = np.ones(len(cid), dtype=np.int64)
    lengths[fam] = c_off[cid[fam] + 1] - c_off[cid[fam]]
    offsets = np.r_[0, np.cumsum(lengths)]
    values = np.repeat(labs, lengths)
    fam_values = np.zeros(0, dtype=np.int64)
    if fam.any():
        n = lengths[fam]
        item = np.repeat(np.arange(len(n)), n)
        within = np.arange(len(item)) - np.repeat(np.cumsum(n) - n, n)
        fam_values = cands[c_off[cid[fam]][item] + within]
        values[offsets[:-1][fam][item] + within] = fam_values
    column = pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int32))
    )
    return column, fam_values


def _output_schema(cols: dict[str, str]) -> pa.Schema:
    fields = [
        pa.field("uid", pa.string()),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("label", pa.int32()),
        pa.field("class_name", pa.string()),
        pa.field("matched_term", pa.string()),
        pa.field("candidates", pa.list_(pa.int32())),
        pa.field("source_file", pa.string()),
        pa.field("source_row", pa.int64()),
    ]
    fields += [pa.field(c, t) for c, t in OPTIONAL_TYPES.items() if c in cols]
    return pa.schema(fields)


def _empty_output(cols: dict[str, str]) -> pa.Table:
    return _output_schema(cols).empty_table()


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
