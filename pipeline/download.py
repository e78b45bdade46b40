"""Stage 2: download the matched rows into webdataset shards with img2dataset.

Steps:
1. Read the text filter's output (it must hold ``_SUCCESS``) and check every URL with
   :mod:`pipeline.urlcheck`; refused rows never reach the downloader and are recorded.
2. Write the allowed rows once to ``<out>/_input/urls.parquet`` (sorted as the text filter
   wrote them), so a rerun hands img2dataset the same list and its incremental mode skips the
   shards it finished (a shard is done when its ``_stats.json`` exists).
3. img2dataset downloads, resizes (keep aspect ratio, short side ``image_size``) and writes
   ``{00000..}.tar``; ``uid``, ``label`` and ``class_name`` ride along into each sample's json.
   Byte and pixel caps (:mod:`pipeline._img2dataset_limits`) refuse oversized responses and
   decompression bombs before they are decoded.
4. ``manifest.parquet`` (one row per input uid with shard, key, status, error and reason),
   ``stats.json`` (success rate overall and per class, failures by reason), then ``_SUCCESS``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import io
from pipeline.config import stage_config, to_dict
from pipeline.urlcheck import check_urls

log = logging.getLogger(__name__)

INPUT_DIR = "_input"
MANIFEST = "manifest.parquet"


@dataclass(frozen=True)
class DownloadConfig:
    """Settings of the download stage (section ``download``); img2dataset's names in brackets."""

    processes: int = 2  # [processes_count]
    threads: int = 32  # [thread_count]
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
    distributor: str = "multiprocessing"
    user_agent_token: str = "primer"

    def __post_init__(self) -> None:
        problems = []
        if self.processes < 1 or self.threads < 1:
            problems.append("processes and threads must be >= 1")
        if self.samples_per_shard < 1:
            problems.append("samples_per_shard must be >= 1")
        if self.resize_mode not in ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"):
            problems.append("resize_mode must be one of no, keep_ratio, keep_ratio_largest, center_crop, border")
        if self.max_image_pixels < 1 or self.max_image_bytes < 1:
            problems.append("max_image_pixels and max_image_bytes must be >= 1")
        if self.distributor not in ("multiprocessing", "pyspark"):
            problems.append("distributor must be multiprocessing or pyspark")
        if problems:
            raise ValueError("; ".join(problems))


# Failure messages (img2dataset's and ours) -> a few reasons people can act on.
_REASONS = [
    (re.compile(r"HTTP Error 404"), "http_404"),
    (re.compile(r"HTTP Error \d+"), "http_error"),
    (re.compile(r"timed out|timeout", re.I), "timeout"),
    (re.compile(r"X-Robots-Tag"), "robots_optout"),
    (re.compile(r"too large", re.I), "too_large"),
    (re.compile(r"not an image", re.I), "not_image"),
    (re.compile(r"decod|truncat|cannot identify|image file", re.I), "decode_error"),
    (re.compile(r"reset|refused|closed|Connection|URLError|RemoteDisconnected|BadStatusLine", re.I), "connection_error"),
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
    """The text filter's rows (uid, url, caption, label, class_name), in its order."""
    if not io.is_done(matches):
        raise io.InputError(f"{matches} is not a complete text-filter output (no {io.SUCCESS}); run `primer filter` first")
    table = io.read_parquet(matches)
    missing = {"uid", "url", "caption", "label", "class_name"} - set(table.column_names)
    if missing:
        raise io.InputError(f"{matches}: missing columns {sorted(missing)}")
    return table.select(["uid", "url", "caption", "label", "class_name"])


def split_allowed(table: pa.Table, allow_private: bool) -> tuple[pa.Table, pa.Table]:
    """(rows to download, refused rows with a ``reason`` column)."""
    reasons = check_urls(table.column("url").to_pylist(), allow_private)
    ok = pa.array([r is None for r in reasons])
    refused = table.filter(pc.invert(ok))
    refused = refused.append_column("reason", pa.array([r for r in reasons if r is not None], pa.string()))
    return table.filter(ok), refused


def _img2dataset_kwargs(cfg: DownloadConfig, url_list: str, out: str) -> dict:
    return dict(
        url_list=url_list,
        output_folder=out,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=["uid", "label", "class_name"],
        output_format="webdataset",
        processes_count=cfg.processes,
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
        enable_wandb=False,
        distributor=cfg.distributor,
        user_agent_token=cfg.user_agent_token,
        # An empty list turns the opt-out check off; None keeps img2dataset's default list.
        disallowed_header_directives=None if cfg.respect_robots_optout else [],
    )


def run_img2dataset(cfg: DownloadConfig, url_list: str, out: str) -> None:
    """Call img2dataset with Primer's limits installed (also in its spawned workers)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ["PRIMER_MAX_IMAGE_BYTES"] = str(cfg.max_image_bytes)
    os.environ["PRIMER_MAX_IMAGE_PIXELS"] = str(cfg.max_image_pixels)
    # OpenCV's own decode limit backs up the header check for formats Pillow cannot read.
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(cfg.max_image_pixels)
    import importlib

    from pipeline import _img2dataset_limits

    # The package re-exports the function `main`, which hides the module of the same name.
    i2d_main = importlib.import_module("img2dataset.main")

    i2d_main.Downloader = _img2dataset_limits.LimitedDownloader
    i2d_main.download(**_img2dataset_kwargs(cfg, url_list, out))


def build_manifest(out: str, allowed: pa.Table, refused: pa.Table) -> pa.Table:
    """One row per input uid: uid, label, class_name, url, shard, key, status, error_message, reason."""
    parts = []
    try:
        shard_files = io.list_files(out, suffixes=(".parquet",))
    except FileNotFoundError:
        shard_files = []
    for f in shard_files:
        name = f.rsplit("/", 1)[-1]
        if not re.fullmatch(r"\d+\.parquet", name):
            continue
        t = io.read_parquet(f, columns=["uid", "key", "status", "error_message"])
        parts.append(t.append_column("shard", pa.array([name[: -len(".parquet")]] * t.num_rows, pa.string())))
    got = pa.concat_tables(parts) if parts else pa.table({"uid": pa.array([], pa.string()), "key": pa.array([], pa.string()), "status": pa.array([], pa.string()), "error_message": pa.array([], pa.string()), "shard": pa.array([], pa.string())})
    by_uid = {u: i for i, u in enumerate(got.column("uid").to_pylist())}
    g = got.to_pydict()
    rows: dict[str, list] = {k: [] for k in ("uid", "label", "class_name", "url", "shard", "key", "status", "error_message", "reason")}
    for r in allowed.select(["uid", "label", "class_name", "url"]).to_pylist():
        i = by_uid.get(r["uid"])
        if i is None:
            status, msg, shard, key = "missing", "not in any finished shard", None, None
        else:
            status, msg, shard, key = g["status"][i], g["error_message"][i], g["shard"][i], g["key"][i]
        rows["uid"].append(r["uid"])
        rows["label"].append(r["label"])
        rows["class_name"].append(r["class_name"])
        rows["url"].append(r["url"])
        rows["shard"].append(shard)
        rows["key"].append(key)
        rows["status"].append(status)
        rows["error_message"].append(msg)
        rows["reason"].append("success" if status == "success" else failure_reason(msg) if status == "failed_to_download" or status == "failed_to_resize" else status)
    for r in refused.select(["uid", "label", "class_name", "url", "reason"]).to_pylist():
        rows["uid"].append(r["uid"])
        rows["label"].append(r["label"])
        rows["class_name"].append(r["class_name"])
        rows["url"].append(r["url"])
        rows["shard"].append(None)
        rows["key"].append(None)
        rows["status"].append(r["reason"])
        rows["error_message"].append(f"URL refused before fetching ({r['reason']})")
        rows["reason"].append(r["reason"])
    schema = pa.schema([("uid", pa.string()), ("label", pa.int32()), ("class_name", pa.string()), ("url", pa.string()), ("shard", pa.string()), ("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()), ("reason", pa.string())])
    return pa.table(rows, schema=schema).sort_by("uid")


def summarize(manifest: pa.Table) -> dict:
    """Success rate overall and per class, failures by reason."""
    status = manifest.column("status").to_pylist()
    reasons = manifest.column("reason").to_pylist()
    classes = manifest.column("class_name").to_pylist()
    total = len(status)
    ok = sum(s == "success" for s in status)
    per_class: dict[str, dict] = {}
    for c, s in zip(classes, status):
        d = per_class.setdefault(c, {"total": 0, "success": 0})
        d["total"] += 1
        d["success"] += s == "success"
    for d in per_class.values():
        d["success_rate"] = round(d["success"] / d["total"], 4) if d["total"] else 0.0
    return {
        "total": total,
        "success": ok,
        "failed": total - ok,
        "success_rate": round(ok / total, 4) if total else 0.0,
        "failures_by_reason": dict(sorted(Counter(r for r in reasons if r != "success").items())),
        "refused_address": sum(r == "refused_address" for r in reasons),
        "per_class": dict(sorted(per_class.items())),
    }


def run_download(cfg: DownloadConfig, matches: str, out: str, overwrite: bool = False) -> dict:
    """Run stage 2; returns the stats (also in ``<out>/stats.json``)."""
    if not io.prepare_output(out, overwrite):
        return io.read_json(io.join(out, "stats.json"))
    t0 = time.perf_counter()
    table = read_matches(matches)
    allowed, refused = split_allowed(table, cfg.allow_private_addresses)
    if refused.num_rows:
        log.warning("download: %d URLs refused before fetching: %s", refused.num_rows, dict(Counter(refused.column("reason").to_pylist())))
    url_list = io.join(out, INPUT_DIR, "urls.parquet")
    if not io.exists(url_list):
        io.write_parquet(allowed, url_list)
    else:
        staged = io.read_parquet(url_list, columns=["uid"]).column("uid").to_pylist()
        if staged != allowed.column("uid").to_pylist():
            raise io.InputError(f"{out}: a previous run downloaded a different list of matches; rerun with --overwrite")
    log.info("download: %d URLs -> %s (%d processes x %d threads)", allowed.num_rows, out, cfg.processes, cfg.threads)
    if allowed.num_rows:
        # img2dataset's incremental mode reads every top-level *.json as "<shard>_stats.json";
        # ours from an interrupted run would crash it. They are rewritten below.
        for name in ("stats.json", "config.json"):
            io.remove(io.join(out, name))
        run_img2dataset(cfg, url_list, out)
    manifest = build_manifest(out, allowed, refused)
    io.write_parquet(manifest, io.join(out, MANIFEST))
    stats = summarize(manifest)
    stats["timings"] = {"total_s": round(time.perf_counter() - t0, 3)}
    if stats["failures_by_reason"].get("missing"):
        raise RuntimeError(f"download: {stats['failures_by_reason']['missing']} rows are in no finished shard; rerun to finish them")
    io.write_json(io.join(out, "config.json"), {"matches": matches, **to_dict(cfg)})
    io.write_json(io.join(out, "stats.json"), stats)
    io.mark_done(out, {"success": stats["success"]})
    log.info("download: %d/%d images (%.1f%%), failures %s", stats["success"], stats["total"], 100 * stats["success_rate"], stats["failures_by_reason"])
    return stats


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("download", parents=[common], help="stage 2: download matched rows into webdataset shards (img2dataset)", description=__doc__.split("\n\n")[0])
    p.add_argument("--matches", required=True, help="the text filter's output directory")
    p.add_argument("--out", required=True, help="output directory URL for the shards")
    p.add_argument("--processes", type=int, help="downloader processes (default from config)")
    p.add_argument("--threads", type=int, help="threads per process")
    p.add_argument("--overwrite", action="store_true", help="redo a complete output")
    p.set_defaults(func=cmd_download)


def cmd_download(args: argparse.Namespace) -> int:
    flags = {"processes": args.processes, "threads": args.threads}
    if getattr(args, "distributor", None):
        flags["distributor"] = args.distributor
    cfg = stage_config(DownloadConfig, "download", args.config, args.overrides, flags)
    stats = run_download(cfg, args.matches, args.out, args.overwrite)
    sys.stdout.write(f"{stats['success']}/{stats['total']} images downloaded -> {args.out}\n")
    return 0
