"""Stage 1: keep the LAION rows whose captions name a target class (Spark over parquet).

How it runs: the driver lists the input files and checks every file's schema from its parquet
footer (a missing column fails at once, naming the file). Spark distributes one task per file;
each task reads the file with pyarrow through fsspec (local, ``s3://``, ``hf://``, any fsspec
URL), in record batches of the needed columns only, matches a whole batch at a time
(:mod:`pipeline.matcher`), applies the row-local filters (size, safety, similarity, caption
length) and writes its matches to ``<out>/_scan/part-<file index>.parquet`` with per-file
stats next to it. A rerun reuses the scan parts that exist, so a killed job resumes.

The global filters run after the scan, on the driver, in Arrow (group-by and sort kernels, no
per-row Python): a row found in several input files is kept once; URL de-duplication keeps
the row of the smallest uid of each URL; the per-class cap keeps the ``max_per_class`` rows
with the smallest seeded hash of their uid (:func:`cap_hash`: a pseudo-random sample, not the
first rows in file order). The driver reads only ``uid``, ``url`` and ``label`` of the
matches, so their keys (about 150 bytes a match: some 15 GB for 100M matches) must fit in
driver memory. It writes the surviving keys of each part to ``_scan/keep-<index>.parquet``,
and Spark tasks rewrite each scan part as ``part-<file index>.parquet``, rows sorted by
(uid, label): the same input and config give the same files, byte for byte.

Output at ``--out``: ``part-<file index>.parquet`` (see docs/architecture.md for the columns),
``_stats.json``, ``_config.json`` and ``_SUCCESS`` last. The JSON files carry a leading
underscore so that ``pyarrow.dataset.dataset(out)`` (which skips ``_``/``.`` names) reads the
parquet parts alone; a plain ``stats.json`` there makes it fail.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import io
from pipeline.config import load_dataset, stage_config, to_dict

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
_KEYS_SCHEMA = pa.schema(
    [("uid", pa.string()), ("url", pa.string()), ("label", pa.int32()), ("part", pa.int64())]
)
# Underscore names: pyarrow.dataset.dataset(out) skips them and reads the parquet parts alone.
STATS = "_stats.json"
CONFIG = "_config.json"


@dataclass(frozen=True)
class TextFilterConfig:
    """Settings of the text filter (section ``filter``).

    Size/safety filters are off at their defaults (0 / 1.0 / 0). ``max_per_class`` 0 keeps
    every match. ``columns`` maps canonical names to the source column names to try.
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
        if self.engine not in ("auto", "hyperscan", "ahocorasick"):
            problems.append("engine must be auto, hyperscan or ahocorasick")
        if problems:
            raise ValueError("; ".join(problems))


def resolve_columns(schema: pa.Schema, mapping: dict, where: str) -> dict[str, str]:
    """Canonical name -> the column of ``schema`` that provides it.

    Raises :class:`pipeline.io.InputError` naming ``where`` and the column when a required
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
) -> pa.Table:
    """The pure core: one record batch in, its kept matches out (canonical columns).

    Counts every row into ``stats`` by outcome: ``rows_scanned``, drops by reason
    (``null_or_empty_caption``, ``caption_too_long``, ``no_match``, ``ambiguous``,
    ``too_small``, ``unsafe``, ``low_similarity``) and ``rows_matched``.
    """
    n = batch.num_rows
    stats["rows_scanned"] += n
    captions = _as_string(batch.column(cols["caption"]))
    urls = _as_string(batch.column(cols["url"]))
    lengths = pc.utf8_length(captions.fill_null("")).to_numpy(zero_copy_only=False)
    empty = (lengths == 0) | np.asarray(captions.is_null().to_numpy(zero_copy_only=False))
    too_long = lengths > cfg.max_caption_chars
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
    rows: list[int] = []
    labs: list[int] = []
    terms: list[int] = []
    single = np.flatnonzero(label >= 0)
    rows.extend(single.tolist())
    labs.extend(label[single].tolist())
    terms.extend(result.term[single].tolist())
    ambiguous = np.flatnonzero(label == -2)
    if cfg.keep_ambiguous:
        for r in ambiguous.tolist():
            for lab, t in result.labels_all[r]:
                rows.append(r)
                labs.append(lab)
                terms.append(t)
    else:
        stats["dropped_ambiguous"] += len(ambiguous)
    if not rows:
        return _empty_output(cols)
    idx = pa.array(rows, pa.int64())
    keep = np.ones(len(rows), dtype=bool)
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
    sel = pa.array(np.flatnonzero(keep))
    idx = idx.take(sel)
    url_sel = urls.take(idx)
    cap_sel = captions.take(idx)
    labels = pa.array(np.asarray(labs, dtype=np.int32)).take(sel)
    terms_sel = pa.array(np.asarray(terms, dtype=np.int64)).take(sel)
    table = pa.table(
        {
            "uid": io.make_uids(url_sel, cap_sel),  # after the filters: it costs ~1 us a row
            "url": url_sel,
            "caption": cap_sel,
            "label": labels,
            "class_name": pa.array(classes, pa.string()).take(labels),
            "matched_term": pa.array([t.text for t in matcher.terms], pa.string()).take(terms_sel),
            **{k: v.take(sel) for k, v in extra.items()},
        }
    )
    stats["rows_matched"] += table.num_rows
    return table


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


# ---------------------------------------------------------------------- per-file task


def _piece_paths(out: str, index: int) -> tuple[str, str]:
    return io.join(out, SCAN_DIR, f"part-{index:05d}.parquet"), io.join(
        out, SCAN_DIR, f"part-{index:05d}.stats.json"
    )


def scan_file(
    index: int, url: str, out: str, cfg: TextFilterConfig, classes: list[str], synonyms: dict
) -> dict:
    """Scan one input file into ``<out>/_scan/part-<index>.parquet`` and return its stats.

    Reuses a completed scan part (its stats file is written after the part). With
    ``skip_bad_files`` an unreadable file is reported in the stats instead of raising.
    """
    part, stats_url = _piece_paths(out, index)
    if io.exists(stats_url):
        return io.read_json(stats_url)
    from pipeline.matcher import Matcher

    t0 = time.perf_counter()
    stats: Counter = Counter()
    timings = {"read_s": 0.0, "match_s": 0.0, "write_s": 0.0}
    # Only reading is guarded: a file that cannot be read is bad input (named, or skipped and
    # listed); an error in the matching code is a bug and always fails the job.
    tables = []
    matcher = Matcher(classes, synonyms, engine=cfg.engine)
    try:
        fs, path = io.url_to_fs(url)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            cols = resolve_columns(pf.schema_arrow, cfg.columns, url)
            batches = pf.iter_batches(batch_size=cfg.batch_rows, columns=sorted(set(cols.values())))
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
                    tables.append(filter_batch(batch, cols, matcher, cfg, classes, stats))
                except Exception as e:  # not a read error: never skipped as a bad file
                    raise RuntimeError(f"{url}: text filter failed on a batch: {e!r}") from e
                timings["match_s"] += time.perf_counter() - t
    except io.InputError:
        raise
    except (OSError, pa.ArrowException, ValueError) as e:
        if not cfg.skip_bad_files:
            raise io.InputError(f"{url}: cannot read parquet ({type(e).__name__}: {e})") from e
        result = {"file": url, "bad_file": f"{type(e).__name__}: {e}"}
        io.write_json(stats_url, result)
        return result
    table = pa.concat_tables(tables) if tables else _empty_output(cols)
    t = time.perf_counter()
    table = _drop_repeated_keys(table.sort_by([("uid", "ascending"), ("label", "ascending")]))
    stats["dropped_duplicate_row"] += stats["rows_matched"] - table.num_rows
    stats["rows_matched"] = table.num_rows
    io.write_parquet(table, part)
    timings["write_s"] += time.perf_counter() - t
    per_class = Counter(table.column("label").to_numpy().tolist())
    result = {
        "file": url,
        "counts": dict(stats),
        "per_class": {str(k): v for k, v in per_class.items()},
        "timings": {**timings, "total_s": time.perf_counter() - t0},
    }
    io.write_json(stats_url, result)
    return result


# ---------------------------------------------------------------------- global filters


def _drop_repeated_keys(table: pa.Table) -> pa.Table:
    """Keep the first row of each run of equal (uid, label) in a table sorted by them."""
    if table.num_rows < 2:
        return table
    uid, lab = table.column("uid"), table.column("label")
    same = pc.and_(
        pc.equal(uid.slice(1), uid.slice(0, table.num_rows - 1)),
        pc.equal(lab.slice(1), lab.slice(0, table.num_rows - 1)),
    )
    keep = np.r_[True, ~same.to_numpy(zero_copy_only=False)]
    return table if keep.all() else table.filter(pa.array(keep))


def cap_hash(uids: pa.Array | pa.ChunkedArray | list[str], seed: int) -> np.ndarray:
    """Seeded 64-bit hash of each uid (32 hex digits): the sampling order of the per-class cap.

    The uid is already a uniform BLAKE2b digest, so its first 64 bits mixed with the seed by
    splitmix64 give an independent pseudo-random order per seed, vectorised.
    """
    arr = pa.chunked_array([uids]) if not isinstance(uids, pa.ChunkedArray) else uids
    arr = arr.combine_chunks() if arr.num_chunks else pa.array([], pa.string())
    if not pa.types.is_string(arr.type):
        arr = pa.array(list(arr.to_pylist()), pa.string())
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + n + 1]
    if not (np.diff(offsets) == 32).all():
        raise ValueError("uids must be 32 hex digits")
    hexd = data[offsets[0] : offsets[-1]].reshape(n, 32)[:, :16]
    nib = np.where(hexd >= ord("a"), hexd - (ord("a") - 10), hexd - ord("0")).astype(np.uint64)
    x = np.zeros(n, dtype=np.uint64)
    for k in range(16):
        x = (x << np.uint64(4)) | nib[:, k]
    return _splitmix64(x ^ _splitmix64(np.array([seed % 2**64], dtype=np.uint64))[0])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def global_keep(keys: pa.Table, cfg: TextFilterConfig) -> tuple[pa.Table, Counter]:
    """Which matches survive the global filters; returns ``(kept uid/label/part, drop counts)``.

    ``keys`` holds ``uid``, ``url``, ``label`` and ``part`` (scan part index) of every match.
    A (uid, label) found in several parts (the same row in two input files) is kept once, in
    its lowest part. De-duplication keeps, per URL, the rows of the smallest uid (all its
    labels when ambiguous rows are kept); the cap keeps per class the ``max_per_class`` rows
    of smallest :func:`cap_hash` (ties by uid).
    """
    counts: Counter = Counter()
    n = keys.num_rows
    keys = keys.group_by(["uid", "label"], use_threads=False).aggregate(
        [("part", "min"), ("url", "min")]
    )
    keys = keys.rename_columns({"part_min": "part", "url_min": "url"})
    counts["dropped_duplicate_row"] += n - keys.num_rows
    if cfg.dedup_urls and keys.num_rows:
        best = keys.group_by("url", use_threads=False).aggregate([("uid", "min")])
        joined = keys.join(best, "url", use_threads=False)
        n = keys.num_rows
        keys = joined.filter(pc.equal(joined.column("uid"), joined.column("uid_min")))
        keys = keys.drop_columns(["uid_min"])
        counts["dropped_duplicate_url"] += n - keys.num_rows
    if cfg.max_per_class and keys.num_rows:
        h = cap_hash(keys.column("uid"), cfg.seed)
        label = keys.column("label").to_numpy()
        uid = np.asarray(keys.column("uid").to_numpy(zero_copy_only=False))
        order = np.lexsort((uid, h, label))
        lab_sorted = label[order]
        first = np.r_[0, np.flatnonzero(lab_sorted[1:] != lab_sorted[:-1]) + 1]
        rank = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
        keep = np.zeros(len(order), dtype=bool)
        keep[order[rank < cfg.max_per_class]] = True
        counts["dropped_over_class_cap"] += int((~keep).sum())
        keys = keys.filter(pa.array(keep))
    return keys.select(["uid", "label", "part"]), counts


def _keep_path(out: str, index: int) -> str:
    return io.join(out, SCAN_DIR, f"keep-{index:05d}.parquet")


def finalize_part(index: int, out: str) -> int:
    """Write ``part-<index>.parquet``: the rows of scan part ``index`` whose (uid, label) its
    keep file lists, sorted by (uid, label). Returns the number of rows written."""
    part, _ = _piece_paths(out, index)
    table = io.read_parquet(part)
    keep = io.read_parquet(_keep_path(out, index)).select(["uid", "label"])
    table = table.join(keep, keys=["uid", "label"], join_type="left semi", use_threads=False)
    table = table.sort_by([("uid", "ascending"), ("label", "ascending")])
    io.write_parquet(table, io.join(out, f"part-{index:05d}.parquet"))
    return table.num_rows


# ---------------------------------------------------------------------- driver


def check_inputs(files: list[str], cfg: TextFilterConfig) -> tuple[list[str], dict[str, str]]:
    """Read every file's footer; returns (readable files, bad files -> reason).

    A missing required column always raises; an unreadable footer raises unless
    ``skip_bad_files``.
    """
    good, bad = [], {}
    for f in files:
        try:
            fs, path = io.url_to_fs(f)
            with fs.open(path, "rb") as fh:
                schema = pq.read_schema(fh)
        except Exception as e:
            if not cfg.skip_bad_files:
                raise io.InputError(
                    f"{f}: not a readable parquet file ({type(e).__name__}: {e})"
                ) from e
            bad[f] = f"{type(e).__name__}: {e}"
            continue
        resolve_columns(schema, cfg.columns, f)
        good.append(f)
    return good, bad


def run_text_filter(
    cfg: TextFilterConfig,
    dataset: str,
    metadata: str,
    out: str,
    master: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Run stage 1; returns the stats dict (also written to ``<out>/_stats.json``).

    Raises :class:`pipeline.io.InputError` for a missing input, a missing column or (without
    ``skip_bad_files``) an unreadable file, naming the file. A failed run leaves no
    ``_SUCCESS``; the rerun reuses finished per-file scans when the files, classes and settings
    are unchanged (and rescans everything otherwise).
    """
    if not io.prepare_output(out, overwrite):
        return io.read_json(io.join(out, STATS))
    t0 = time.perf_counter()
    spec = load_dataset(dataset)
    files = io.list_files(metadata, suffixes=(".parquet",))
    # Indices follow the sorted input list, so part names are stable across reruns.
    indexed = list(enumerate(files))
    good, bad = check_inputs(files, cfg)
    good_set = set(good)
    todo = [(i, f) for i, f in indexed if f in good_set]
    log.info(
        "text filter: %d files (%d unreadable), %d classes -> %s",
        len(files),
        len(bad),
        spec.num_classes,
        out,
    )
    classes, synonyms = list(spec.classes), {k: list(v) for k, v in spec.synonyms.items()}
    _check_scan_fingerprint(
        out, {"config": to_dict(cfg), "classes": classes, "synonyms": synonyms, "files": files}
    )
    from pipeline.spark import get_spark

    spark = get_spark(master, app_name=f"primer-filter-{spec.name}")
    sc = spark.sparkContext
    t_scan = time.perf_counter()
    try:
        results = (
            sc.parallelize(todo, max(1, len(todo)))
            .map(lambda p: scan_file(p[0], p[1], out, cfg, classes, synonyms))
            .collect()
        )
    except Exception as e:
        raise io.InputError(_spark_error_message(e)) from None
    scan_s = time.perf_counter() - t_scan
    for r in results:
        if "bad_file" in r:
            bad[r["file"]] = r["bad_file"]
    done = [i for (i, f), r in zip(todo, results) if "bad_file" not in r]
    counts: Counter = Counter()
    per_class: Counter = Counter()
    timings: Counter = Counter()
    for r in results:
        counts.update(r.get("counts", {}))
        per_class.update({int(k): v for k, v in r.get("per_class", {}).items()})
        timings.update(r.get("timings", {}))
    # Global filters over the keys of all matches (driver), then tasks rewrite the parts.
    from tqdm import tqdm

    t_global = time.perf_counter()
    key_tables = []
    for i in tqdm(done, desc="read match keys", unit="part", disable=None):
        t = io.read_parquet(_piece_paths(out, i)[0], columns=["uid", "url", "label"])
        key_tables.append(t.append_column("part", pa.array(np.full(t.num_rows, i, dtype=np.int64))))
    keys = pa.concat_tables(key_tables) if key_tables else _KEYS_SCHEMA.empty_table()
    kept, gcounts = global_keep(keys, cfg)
    del keys, key_tables
    counts.update(gcounts)
    kept = kept.sort_by("part")
    parts = kept.column("part").to_numpy()
    bounds = np.searchsorted(parts, np.asarray(done, dtype=np.int64), side="left")
    bounds_end = np.searchsorted(parts, np.asarray(done, dtype=np.int64), side="right")
    for i, a, b in tqdm(
        list(zip(done, bounds, bounds_end)), desc="write keep lists", unit="part", disable=None
    ):
        io.write_parquet(kept.slice(a, b - a).select(["uid", "label"]), _keep_path(out, i))
    final_per_class = Counter(kept.column("label").to_numpy().tolist())
    del kept, parts
    kept_rows = (
        sc.parallelize(done, max(1, len(done))).map(lambda i: finalize_part(i, out)).collect()
    )
    global_s = time.perf_counter() - t_global
    stats = {
        "dataset": spec.name,
        "files": len(files),
        "bad_files": bad,
        "rows_scanned": int(counts.get("rows_scanned", 0)),
        "rows_matched_before_global_filters": int(counts.get("rows_matched", 0)),
        "rows_matched": int(sum(kept_rows)),
        "dropped": {
            k[len("dropped_") :]: int(v)
            for k, v in sorted(counts.items())
            if k.startswith("dropped_")
        },
        "per_class": {
            spec.classes[c]: int(final_per_class.get(c, 0)) for c in range(spec.num_classes)
        },
        "empty_classes": [
            spec.classes[c] for c in range(spec.num_classes) if not final_per_class.get(c)
        ],
        "timings": {
            "scan_wall_s": round(scan_s, 3),
            "global_s": round(global_s, 3),
            "total_s": round(time.perf_counter() - t0, 3),
            "task_read_s": round(timings.get("read_s", 0.0), 3),
            "task_match_s": round(timings.get("match_s", 0.0), 3),
            "task_write_s": round(timings.get("write_s", 0.0), 3),
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
    for marker in ("pipeline.io.InputError: ", "InputError: "):
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
