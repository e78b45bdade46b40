"""Stage 2: download the matched rows into webdataset shards with img2dataset.

Steps:
1. Read the text filter's output (it must hold ``_SUCCESS``) and check every URL with
   :mod:`pipeline.download.urlcheck`; refused rows never reach the downloader and are recorded.
2. Write the allowed rows once to ``<out>/_input/urls.parquet`` (in the text filter's order),
   so a rerun hands img2dataset the same list and its incremental mode skips the shards it
   finished (a shard is done when its ``{shard}_stats.json`` exists).
3. img2dataset downloads, resizes (keep aspect ratio, short side ``image_size``) and writes
   ``{00000..}.tar``; ``uid``, ``label``, ``class_name`` and ``candidates`` (the classes a
   family row may be, for the CLIP filter to pick from) ride along into each sample's json.
   :mod:`pipeline.download.limits` refuses oversized responses and decompression bombs
   before they are decoded and connections whose peer address is not public (redirects, DNS).
4. ``manifest.parquet`` (one row per input (uid, label) with shard, key, status, error and
   reason), ``stats.json`` (success rate overall and per class, failures by reason), then
   ``_SUCCESS``. Staging files are removed.

A caption naming two classes is matched once per class (same uid, two labels, as in the Neural
Priming reference); each such row is downloaded as its own sample, so embeddings carry both.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import fingerprint, io
from pipeline.core.config import to_dict
from pipeline.core.fingerprint import result_field
from pipeline.download import urlcheck
from pipeline.download.urlcheck import check_urls

log = logging.getLogger(__name__)

INPUT_DIR = "_input"
MANIFEST = "manifest.parquet"
MATCH_COLUMNS = ("uid", "url", "caption", "label", "class_name")
# The shards', manifest's and stats' layout; an output of another is never reused.
OUTPUT_FORMAT = 1
# Carried when the matches have it (the text filter's since its scan format 5).
CANDIDATES = "candidates"


@dataclass(frozen=True)
class DownloadConfig:
    """Settings of the download stage (section ``download``); img2dataset's names in brackets."""

    # How the work is done (left out of the output's fingerprint). processes 0: one per core,
    # as img2dataset advises.
    processes: int = result_field(0)  # [processes_count]
    threads: int = result_field(32)  # [thread_count]
    samples_per_shard: int = 10000  # [number_sample_per_shard]
    image_size: int = 224
    resize_mode: str = "keep_ratio"  # short side = image_size, aspect kept
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95
    timeout: int = 10
    retries: int = 1
    min_image_size: int = 0
    max_aspect_ratio: float = 0.0  # 0 = no limit
    max_image_pixels: int = 89_478_485  # declared width x height; bombs are refused
    max_image_bytes: int = 32 * 2**20
    respect_robots_optout: bool = True  # X-Robots-Tag noai/noimageai/noindex/noimageindex
    allow_private_addresses: bool = False
    distributor: str = result_field("multiprocessing")  # or pyspark (jobs/download.py)
    max_shard_retry: int = result_field(1)  # retries of a failed shard within a run
    user_agent_token: str = "primer"

    def __post_init__(self) -> None:
        problems = []
        if self.processes < 0 or self.threads < 1:
            problems.append("processes must be >= 0 (0: one per core) and threads >= 1")
        if self.samples_per_shard < 1:
            problems.append("samples_per_shard must be >= 1")
        if self.image_size < 1:
            problems.append("image_size must be >= 1")
        if self.timeout <= 0 or self.retries < 0 or self.max_shard_retry < 0:
            problems.append("timeout must be > 0, retries and max_shard_retry >= 0")
        if self.encode_format not in ("jpg", "png", "webp"):
            problems.append("encode_format must be jpg, png or webp")
        if self.resize_mode not in (
            "no",
            "keep_ratio",
            "keep_ratio_largest",
            "center_crop",
            "border",
        ):
            problems.append(
                "resize_mode must be one of no, keep_ratio, keep_ratio_largest, center_crop, border"
            )
        if self.max_image_pixels < 1 or self.max_image_bytes < 1:
            problems.append("max_image_pixels and max_image_bytes must be >= 1")
        if self.distributor not in ("multiprocessing", "pyspark"):
            problems.append("distributor must be multiprocessing or pyspark")
        if problems:
            raise ValueError("; ".join(problems))

    def worker_processes(self) -> int:
        """``processes``, with 0 resolved to this machine's core count."""
        return self.processes or os.cpu_count() or 1


# Failure messages (img2dataset's and ours) -> a few reasons people can act on.
_REASONS = [
    (re.compile(r"refused_address"), "refused_address"),  # the connect-time address check
    (re.compile(r"HTTP Error 404"), "http_404"),
    (re.compile(r"HTTP Error \d+"), "http_error"),
    (re.compile(r"timed out|timeout", re.I), "timeout"),
    (re.compile(r"X-Robots-Tag"), "robots_optout"),
    (re.compile(r"too large", re.I), "too_large"),
    (re.compile(r"not an image", re.I), "not_image"),
    (re.compile(r"decod|truncat|cannot identify|image file", re.I), "decode_error"),
    (
        re.compile(
            r"reset|refused|closed|Connection|URLError|RemoteDisconnected|BadStatusLine", re.I
        ),
        "connection_error",
    ),
    (re.compile(r"aspect ratio|too small|image size", re.I), "size_filter"),
]


def failure_reason(message: str | None) -> str:
    """Normalise an error message into a reason (``other`` when nothing fits)."""
    if not message:
        return "other"
    for pattern, reason in _REASONS:
        if pattern.search(message):
            return reason
    return "other"


def read_matches(matches: str) -> pa.Table:
    """The text filter's rows (``uid``, ``url``, ``caption``, ``label``, ``class_name``).

    Raises:
        pipeline.core.io.InputError: ``matches`` has no ``_SUCCESS`` (an unfinished or foreign
            directory), holds no parquet files, or lacks one of those columns.
    """
    if not io.is_done(matches):
        raise io.InputError(
            f"{matches} is not a complete text-filter output (no {io.SUCCESS}); run `primer filter` first"
        )
    try:
        table = io.read_parquet(matches)
    except FileNotFoundError:
        raise io.InputError(f"{matches}: no parquet files in the text-filter output") from None
    missing = sorted(set(MATCH_COLUMNS) - set(table.column_names))
    if missing:
        raise io.InputError(f"{matches}: missing columns {missing} (have {table.column_names})")
    table = table.select(
        list(MATCH_COLUMNS) + [c for c in (CANDIDATES,) if c in table.column_names]
    )
    table = table.set_column(3, "label", pc.cast(table.column("label"), pa.int32()))
    if CANDIDATES in table.column_names:
        i = table.column_names.index(CANDIDATES)
        table = table.set_column(i, CANDIDATES, pc.cast(table.column(i), pa.list_(pa.int32())))
    return table


def dedupe(table: pa.Table) -> tuple[pa.Table, int]:
    """Keep the first row of each (uid, label); returns (rows in input order, rows dropped).

    The text filter writes each (uid, label) once, but a hand-made input may repeat rows, and a
    repeated key would be downloaded twice and join ambiguously into the manifest.
    """
    if table.num_rows == 0:
        return table, 0
    idx = table.select(["uid", "label"]).append_column("_i", pa.array(np.arange(table.num_rows)))
    first = (
        idx.group_by(["uid", "label"], use_threads=False)
        .aggregate([("_i", "min")])
        .column("_i_min")
    )
    keep = np.sort(first.to_numpy())
    return table.take(pa.array(keep)), table.num_rows - len(keep)


def split_allowed(table: pa.Table, allow_private: bool) -> tuple[pa.Table, pa.Table]:
    """(rows to download, refused rows with a ``reason`` column), both in input order."""
    reasons = pa.array(check_urls(table.column("url"), allow_private), pa.string())
    ok = pc.is_null(reasons)
    refused = table.filter(pc.invert(ok)).append_column("reason", reasons.filter(pc.invert(ok)))
    return table.filter(ok), refused


def _img2dataset_kwargs(
    cfg: DownloadConfig, url_list: str, out: str, extra: tuple[str, ...] = ()
) -> dict:
    return dict(
        url_list=url_list,
        output_folder=out,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=["uid", "label", "class_name", *extra],
        output_format="webdataset",
        processes_count=cfg.worker_processes(),
        thread_count=cfg.threads,
        number_sample_per_shard=cfg.samples_per_shard,
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_format=cfg.encode_format,
        encode_quality=cfg.encode_quality,
        timeout=cfg.timeout,
        retries=cfg.retries,
        min_image_size=cfg.min_image_size,
        max_image_area=float(cfg.max_image_pixels),
        max_aspect_ratio=float(cfg.max_aspect_ratio) if cfg.max_aspect_ratio > 0 else float("inf"),
        incremental_mode="incremental",
        max_shard_retry=cfg.max_shard_retry,
        enable_wandb=False,
        distributor=cfg.distributor,
        user_agent_token=cfg.user_agent_token,
        # An empty list turns the opt-out check off; None keeps img2dataset's default list.
        disallowed_header_directives=None if cfg.respect_robots_optout else [],
    )


def run_img2dataset(
    cfg: DownloadConfig,
    url_list: str,
    out: str,
    num_rows: int | None = None,
    extra: tuple[str, ...] = (),
) -> None:
    """Call ``img2dataset.download`` on ``url_list`` with Primer's parts installed
    (:mod:`pipeline.download.limits`: byte/pixel caps, connect-time address check,
    forkserver workers). Its chatter goes to stderr so a CLI's stdout stays its result."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else albumentations asks PyPI
    os.environ.setdefault("WANDB_MODE", "disabled")
    # OpenCV's own decode limit backs up the header check for formats Pillow cannot read
    # (spawned and forked workers inherit it; Spark executors keep their own default).
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(cfg.max_image_pixels)
    import contextlib

    from pipeline.download import limits as _img2dataset_limits

    if cfg.distributor == "pyspark":
        from pipeline.core.spark import get_spark

        # img2dataset uses the active session (spark-submit's) and otherwise starts its own with
        # a 16 GB driver; ours has offline-safe local settings and is left running for the caller.
        get_spark()
    total = -(-num_rows // cfg.samples_per_shard) if num_rows else None
    i2d_main = _img2dataset_limits._i2d_main
    with (
        _img2dataset_limits.patched(
            cfg.max_image_bytes, cfg.max_image_pixels, cfg.allow_private_addresses, total
        ),
        contextlib.redirect_stdout(sys.stderr),
    ):
        i2d_main.download(**_img2dataset_kwargs(cfg, url_list, out, extra))


_SHARD_PARQUET = re.compile(r"(\d+)\.parquet")
_GOT_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("label", pa.int32()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("shard", pa.string()),
    ]
)
MANIFEST_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("url", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("reason", pa.string()),
        (CANDIDATES, pa.list_(pa.int32())),  # null where the matches had none
    ]
)


def read_shard_results(out: str) -> pa.Table:
    """img2dataset's per-shard ``{shard}.parquet`` rows of finished shards (those with
    ``{shard}_stats.json``): uid, label, key, status, error_message, shard."""
    try:
        files = io.list_files(out, suffixes=(".parquet", "_stats.json"))
    except FileNotFoundError:
        files = []
    names = {f.rsplit("/", 1)[-1]: f for f in files}
    parts = []
    for name, f in sorted(names.items()):
        m = _SHARD_PARQUET.fullmatch(name)
        if not m or f"{m.group(1)}_stats.json" not in names:
            continue  # a shard cut off part way: not finished, its rows count as missing
        t = io.read_parquet(f, columns=["uid", "label", "key", "status", "error_message"])
        t = t.append_column("shard", pa.array([m.group(1)] * t.num_rows, pa.string()))
        parts.append(t.cast(_GOT_SCHEMA))
    return pa.concat_tables(parts) if parts else _GOT_SCHEMA.empty_table()


def failure_reasons(
    status: pa.Array | pa.ChunkedArray, message: pa.Array | pa.ChunkedArray
) -> pa.Array:
    """Reason per row: ``success``; :func:`failure_reason` of the message for img2dataset's
    ``failed_to_*`` statuses; the status itself otherwise (``refused_address``, ``missing``).
    Messages are classified once per distinct text, not once per row."""
    message = pc.fill_null(message, "")
    distinct = pc.unique(message)
    reason_of = pa.array([failure_reason(m) for m in distinct.to_pylist()], pa.string())
    by_message = pc.take(reason_of, pc.index_in(message, value_set=distinct))
    failed = pc.starts_with(pc.fill_null(status, ""), "failed_to_")
    out = pc.if_else(pc.equal(status, "success"), "success", pc.if_else(failed, by_message, status))
    return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out


def build_manifest(got: pa.Table, allowed: pa.Table, refused: pa.Table) -> pa.Table:
    """One row per input (uid, label), sorted by them (schema :data:`MANIFEST_SCHEMA`).

    Args:
        got: :func:`read_shard_results` of the output.
        allowed: the rows handed to img2dataset (uid, url, caption, label, class_name).
        refused: the rows refused before fetching, with their ``reason``.

    Allowed rows in no finished shard get status ``missing``.
    """
    allowed, refused = _with_candidates(allowed), _with_candidates(refused)
    # Arrow's join carries no list column: the candidates follow by row number.
    joined = (
        allowed.select(["uid", "label", "class_name", "url"])
        .append_column("_row", pa.array(np.arange(allowed.num_rows, dtype=np.int64)))
        .join(got, keys=["uid", "label"], join_type="left outer", use_threads=False)
    )
    candidates = allowed.column(CANDIDATES).take(joined.column("_row"))
    status = pc.fill_null(joined.column("status"), "missing")
    message = pc.if_else(
        pc.is_null(joined.column("status")),
        "not in any finished shard",
        joined.column("error_message"),
    )
    dl = pa.table(
        {
            "uid": joined.column("uid"),
            "label": joined.column("label"),
            "class_name": joined.column("class_name"),
            "url": joined.column("url"),
            "shard": joined.column("shard"),
            "key": joined.column("key"),
            "status": status,
            "error_message": message,
        }
    )
    dl = dl.append_column(
        "reason", failure_reasons(dl.column("status"), dl.column("error_message"))
    ).append_column(CANDIDATES, candidates)
    n = refused.num_rows
    nulls = pa.nulls(n, pa.string())
    ref = pa.table(
        {
            "uid": refused.column("uid"),
            "label": refused.column("label"),
            "class_name": refused.column("class_name"),
            "url": refused.column("url"),
            "shard": nulls,
            "key": nulls,
            "status": refused.column("reason"),
            "error_message": pc.binary_join_element_wise(
                "URL refused before fetching (", refused.column("reason"), ")", ""
            ),
            "reason": refused.column("reason"),
            CANDIDATES: refused.column(CANDIDATES),
        }
    )
    table = pa.concat_tables([dl.cast(MANIFEST_SCHEMA), ref.cast(MANIFEST_SCHEMA)])
    return table.sort_by([("uid", "ascending"), ("label", "ascending")])


def _with_candidates(table: pa.Table) -> pa.Table:
    """``table`` with a ``candidates`` column (all null where it had none)."""
    if CANDIDATES in table.column_names:
        return table
    return table.append_column(CANDIDATES, pa.nulls(table.num_rows, pa.list_(pa.int32())))


def summarize(manifest: pa.Table) -> dict:
    """Success rate overall and per class, failures by reason."""
    total = manifest.num_rows
    success = pc.equal(manifest.column("status"), "success")
    ok = int(pc.sum(success).as_py() or 0)
    per = (
        pa.table(
            {
                "class_name": pc.fill_null(manifest.column("class_name"), ""),
                "ok": pc.cast(success, pa.int64()),
            }
        )
        .group_by("class_name", use_threads=False)
        .aggregate([("ok", "count"), ("ok", "sum")])
        .to_pylist()
    )
    per_class = {
        r["class_name"]: {
            "total": r["ok_count"],
            "success": r["ok_sum"],
            "success_rate": round(r["ok_sum"] / r["ok_count"], 4),
        }
        for r in per
    }
    failures = pc.value_counts(manifest.column("reason").filter(pc.invert(success)))
    by_reason = {d["values"]: d["counts"] for d in failures.to_pylist()}
    return {
        "total": total,
        "success": ok,
        "failed": total - ok,
        "success_rate": round(ok / total, 4) if total else 0.0,
        "failures_by_reason": dict(sorted(by_reason.items())),
        "refused_address": by_reason.get(urlcheck.REASON_ADDRESS, 0),
        "per_class": dict(sorted(per_class.items())),
    }


def stage_input(allowed: pa.Table, out: str) -> str:
    """Write the rows to download to ``<out>/_input/urls.parquet`` once; returns its URL.

    A rerun must hand img2dataset the same list in the same order, because its incremental
    mode knows finished shards only by number. Raises ``InputError`` when a previous,
    unfinished run staged a different list (other matches or other settings).
    """
    url_list = io.join(out, INPUT_DIR, "urls.parquet")
    if io.exists(url_list):
        staged = io.read_parquet(url_list, columns=["uid", "label"])
        if not staged.equals(allowed.select(["uid", "label"]).cast(staged.schema)):
            raise io.InputError(
                f"{out}: an unfinished earlier run downloaded a different list of rows (other matches or settings); rerun with --overwrite"
            )
    else:
        io.write_parquet(allowed, url_list)
    return url_list


def run_download(cfg: DownloadConfig, matches: str, out: str, overwrite: bool = False) -> dict:
    """Run stage 2: ``matches`` (a text-filter output) -> webdataset shards at ``out``.

    Returns the stats (also written to ``<out>/stats.json``). A complete ``out`` is skipped
    unless ``overwrite``; an incomplete one resumes (finished shards are kept).

    Raises:
        pipeline.core.io.InputError: bad ``matches`` (see :func:`read_matches`), or ``out`` holds an
            unfinished run over a different list.
        RuntimeError: shards still unfinished after img2dataset's retries (rerun to resume).
    """
    fp = fingerprint.make(
        "download",
        OUTPUT_FORMAT,
        fingerprint.result_settings(cfg),
        {"matches": fingerprint.input_identity(matches, (".parquet",))},
    )
    if not fingerprint.prepare(out, fp, overwrite):
        return io.read_json(io.join(out, "stats.json"))
    timings = {}
    t0 = time.perf_counter()
    table, duplicates = dedupe(read_matches(matches))
    allowed, refused = split_allowed(table, cfg.allow_private_addresses)
    if refused.num_rows:
        counts = dict(Counter(refused.column("reason").to_pylist()))
        log.warning(
            "download: %d of %d URLs refused before fetching: %s",
            refused.num_rows,
            table.num_rows,
            counts,
        )
    url_list = stage_input(allowed, out)
    timings["check_s"] = round(time.perf_counter() - t0, 3)
    t1 = time.perf_counter()
    if allowed.num_rows:
        log.info(
            "download: %d URLs -> %s (%s, %d processes x %d threads)",
            allowed.num_rows,
            out,
            cfg.distributor,
            cfg.worker_processes(),
            cfg.threads,
        )
        # img2dataset's incremental mode reads every top-level *.json as "<shard>_stats.json";
        # ours, left by a run that died before _SUCCESS, would crash it. Rewritten below.
        for name in ("stats.json", "config.json"):
            io.remove(io.join(out, name))
        extra = tuple(c for c in (CANDIDATES,) if c in allowed.column_names)
        run_img2dataset(cfg, url_list, out, allowed.num_rows, extra)
    timings["download_s"] = round(time.perf_counter() - t1, 3)
    t2 = time.perf_counter()
    manifest = build_manifest(read_shard_results(out), allowed, refused)
    stats = summarize(manifest)
    missing = stats["failures_by_reason"].get("missing", 0)
    if missing:
        raise RuntimeError(
            f"download: {missing} rows are in no finished shard of {out}; rerun to finish them"
        )
    io.write_parquet(manifest, io.join(out, MANIFEST))
    stats["duplicate_rows"] = duplicates
    stats["images_per_s"] = (
        round(stats["success"] / timings["download_s"], 2) if timings["download_s"] else 0.0
    )
    timings["manifest_s"] = round(time.perf_counter() - t2, 3)
    timings["total_s"] = round(time.perf_counter() - t0, 3)
    stats["timings"] = timings
    io.write_json(io.join(out, "config.json"), {"matches": matches, **to_dict(cfg)})
    io.write_json(io.join(out, "stats.json"), stats)
    # Staging is rebuilt from the matches if needed; img2dataset leaves _tmp behind on S3.
    for name in (INPUT_DIR, "_tmp"):
        io.remove(io.join(out, name))
    io.mark_done(out, {"success": stats["success"], "total": stats["total"]})
    log.info(
        "download: %d/%d images (%.1f%%), failures %s",
        stats["success"],
        stats["total"],
        100 * stats["success_rate"],
        stats["failures_by_reason"],
    )
    return stats
