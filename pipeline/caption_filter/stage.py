"""Stage 1b: keep the text filter's matches whose caption uses the class name in the class's
sense (a sentence encoder's score per row), one Spark task per match file.

The score is :mod:`pipeline.caption_filter.score`'s; this module is its Spark shell.

Input: a complete text-filter output (``_SUCCESS``; parquet parts with ``caption`` and
``label``). Output at ``--out``: ``part-<index>.parquet`` per match file in sorted order (its
kept rows, the input's columns plus ``sense_score`` float32), ``_stats.json`` (rows kept and
dropped, per class), ``_config.json`` and ``_SUCCESS`` last; ``primer download --matches`` reads
it as it reads the text filter's. A failed run resumes: a match file whose marker
(``_parts/part-<index>.stats.json``, written after its part) exists is not scored again, when
the inputs and settings are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.caption_filter.config import CONFIG, PARTS_DIR, STATS, CaptionFilterConfig
from pipeline.caption_filter.score import build_index, class_counts, keep, score_captions
from pipeline.core import fingerprint, io
from pipeline.core.config import load_dataset, to_dict

log = logging.getLogger(__name__)

# The layout of the parts and markers; a failed run's parts of another layout are not reused.
PARTS_FORMAT = 1


def _part_path(out: str, index: int) -> str:
    return io.join(out, f"part-{index:05d}.parquet")


def _marker_path(out: str, index: int) -> str:
    return io.join(out, PARTS_DIR, f"part-{index:05d}.stats.json")


# The dataset and class prototypes of the last job, per process (see encoders._CACHE).
_INDEX: dict = {}


def _scorer(cfg: CaptionFilterConfig, dataset: str, embed_cfg):
    from pipeline.caption_filter.encoders import load_encoder

    encoder = load_encoder(cfg, embed_cfg)
    key = (dataset, encoder.name, repr(cfg.templates), repr(cfg.negatives), repr(cfg.negatives_for))
    if key not in _INDEX:
        _INDEX.clear()
        spec = load_dataset(dataset)
        negatives = cfg.negatives_of(spec.name)
        _INDEX[key] = (spec, build_index(spec, cfg.templates, negatives, encoder.encode))
    spec, index = _INDEX[key]
    return spec, encoder, index


def _read_matches(url: str) -> pa.Table:
    fs, path = io.url_to_fs(url)
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh)


def filter_file(
    index: int,
    url: str,
    out: str,
    cfg: CaptionFilterConfig,
    dataset: str,
    embed_cfg=None,
    threads: int = 0,
) -> dict:
    """Score one match file and write its kept rows to ``part-<index>.parquet``, then its
    marker; return its stats (the marker's content; a file already done is not read again).

    Raises :class:`pipeline.core.io.InputError` for an unreadable file (unless
    ``skip_bad_files``: then its stats name it), a missing ``caption``/``label`` column or a
    label outside the dataset's classes (matches of another dataset).
    """
    marker = _marker_path(out, index)
    if io.exists(marker):
        return io.read_json(marker)
    t0 = time.perf_counter()
    if threads:
        import torch

        torch.set_num_threads(threads)  # one Spark task per core: no oversubscription
    spec, encoder, sense_index = _scorer(cfg, dataset, embed_cfg)
    try:
        table = _read_matches(url)
    except (OSError, pa.ArrowException, ValueError) as e:
        if not cfg.skip_bad_files:
            raise io.InputError(f"{url}: cannot read parquet ({type(e).__name__}: {e})") from e
        result = {"file": url, "bad_file": f"{type(e).__name__}: {e}"}
        io.write_json(marker, result)
        return result
    t_read = time.perf_counter() - t0
    missing = [c for c in ("caption", "label") if c not in table.column_names]
    if missing:
        raise io.InputError(
            f"{url}: missing column(s) {missing} (have {table.column_names}); the input must be "
            "a text-filter output (`primer filter --out`)"
        )
    labels = table.column("label").to_numpy(zero_copy_only=False)
    if len(labels) and (
        not np.issubdtype(labels.dtype, np.integer)
        or labels.min() < 0
        or labels.max() >= spec.num_classes
    ):
        raise io.InputError(
            f"{url}: labels outside 0..{spec.num_classes - 1}; are these matches of another "
            f"dataset than {spec.name}?"
        )
    labels = labels.astype(np.int64)
    t = time.perf_counter()
    scores = score_captions(
        table.column("caption"), labels, sense_index, encoder.encode, cfg.batch_size
    )
    t_score = time.perf_counter() - t
    kept, mask = keep(table, scores, cfg.threshold_for(spec.name))
    t = time.perf_counter()
    io.write_parquet(kept, _part_path(out, index))
    t_write = time.perf_counter() - t
    per_kept, per_dropped = class_counts(labels, mask, spec.num_classes)
    result = {
        "file": url,
        "rows": int(table.num_rows),
        "kept": int(mask.sum()),
        "blank_captions": int(np.isnan(scores).sum()),
        "kept_per_class": {str(c): n for c, n in enumerate(per_kept) if n},
        "dropped_per_class": {str(c): n for c, n in enumerate(per_dropped) if n},
        "timings": {
            "read_s": t_read,
            "score_s": t_score,
            "write_s": t_write,
            "total_s": time.perf_counter() - t0,
        },
    }
    io.write_json(marker, result)  # last: the part is complete when its marker exists
    return result


def check_fingerprint(out: str, inputs: dict) -> None:
    """Reuse the parts of a failed run only when they came from the same inputs and settings;
    otherwise clear them (parts and markers) before scoring anew."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    url = io.join(out, PARTS_DIR, "_inputs.json")
    if io.exists(url):
        if io.read_json(url).get("sha256") == digest:
            log.info("resuming: reusing finished match files in %s", out)
            return
        log.warning("inputs or settings changed since the failed run; scoring everything again")
    io.remove(io.join(out, PARTS_DIR))
    try:
        stale = io.list_files(out, suffixes=(".parquet",))
    except FileNotFoundError:
        stale = []
    for f in stale:
        io.remove(f)
    io.write_json(url, {"sha256": digest})


def fingerprint_inputs(cfg: CaptionFilterConfig, spec, files: list[str], embed_cfg=None) -> dict:
    """What the parts depend on: a failed run's parts are reused only when this is unchanged."""
    return {
        # Where and how fast it runs, and whether bad files are skipped, change no part: a
        # rerun after a crash with other such settings reuses the finished ones.
        "config": {
            k: v
            for k, v in to_dict(cfg).items()
            if k not in ("device", "batch_size", "skip_bad_files")
        },
        "embed": to_dict(embed_cfg)
        if embed_cfg is not None and cfg.encoder == "open_clip"
        else None,
        "dataset": spec.name,
        "classes": list(spec.classes),
        "senses": [spec.sense_of(i) for i in range(spec.num_classes)],
        "files": [(f, _size(f)) for f in files],
        "format": PARTS_FORMAT,
    }


def run_caption_filter(
    cfg: CaptionFilterConfig,
    dataset: str,
    matches: str,
    out: str,
    master: str | None = None,
    overwrite: bool = False,
    embed_cfg=None,
) -> dict:
    """Run stage 1b over every match file of ``matches`` in Spark tasks. Returns the stats dict
    (also written to ``<out>/_stats.json``).

    Raises :class:`pipeline.core.io.InputError` when ``matches`` is not a complete text-filter
    output or holds no parquet file, and for the bad files :func:`filter_file` names.
    """
    if not io.is_done(matches):
        raise io.InputError(
            f"{matches} is not a complete text-filter output (no {io.SUCCESS}); run `primer filter` first"
        )
    try:
        files = io.list_files(matches, suffixes=(".parquet",))
    except FileNotFoundError:
        raise io.InputError(f"{matches}: no parquet files in the text-filter output") from None
    from pipeline.embed.model import model_identity

    spec = load_dataset(dataset)
    fp = fingerprint.make(
        "caption-filter",
        PARTS_FORMAT,
        fingerprint.result_settings(cfg),
        {"matches": fingerprint.input_identity(matches, (".parquet",))},
        dataset={
            **spec.identity("classes"),
            "senses": [spec.sense_of(i) for i in range(spec.num_classes)],
        },
        model=model_identity(embed_cfg)
        if embed_cfg is not None and cfg.encoder == "open_clip"
        else None,
    )
    if not fingerprint.prepare(out, fp, overwrite):
        return io.read_json(io.join(out, STATS))
    t0 = time.perf_counter()
    check_fingerprint(out, fingerprint_inputs(cfg, spec, files, embed_cfg))
    from pipeline.core.spark import JobProgress, get_spark, in_task, task_error_message

    sc = get_spark(master, app_name=f"primer-caption-filter-{spec.name}").sparkContext
    threads = max(1, (os.cpu_count() or 1) // max(1, sc.defaultParallelism))
    name = spec.path  # workers load the same YAML (a bundled name or a user's file)
    work = list(enumerate(files))
    options = io.configured()
    t_scan = time.perf_counter()
    try:
        with JobProgress(sc, "caption filter", len(work), unit="file"):
            results = (
                sc.parallelize(work, max(1, len(work)))
                .map(
                    lambda w: in_task(options, filter_file, *w, out, cfg, name, embed_cfg, threads)
                )
                .collect()
            )
    except Exception as e:
        raise io.InputError(task_error_message(e, "caption filter")) from None
    stats = _stats(results, spec, cfg, files)
    stats["timings"] = {
        "scan_wall_s": round(time.perf_counter() - t_scan, 3),
        "task_score_s": round(sum(r.get("timings", {}).get("score_s", 0.0) for r in results), 3),
        "total_s": round(time.perf_counter() - t0, 3),
    }
    io.write_json(io.join(out, CONFIG), {"dataset": dataset, "matches": matches, **to_dict(cfg)})
    io.write_json(io.join(out, STATS), stats)
    io.mark_done(out, {"rows": stats["rows_kept"]})
    io.remove(io.join(out, PARTS_DIR))
    log.info(
        "caption filter: %d of %d matches kept (threshold %.3f) in %.1f s",
        stats["rows_kept"], stats["rows_in"], stats["threshold"], stats["timings"]["total_s"],
    )  # fmt: skip
    return stats


def _size(url: str) -> int:
    fs, path = io.url_to_fs(url)
    return int(fs.size(path))


def _stats(results: list[dict], spec, cfg: CaptionFilterConfig, files: list[str]) -> dict:
    kept: Counter = Counter()
    dropped: Counter = Counter()
    for r in results:
        kept.update({int(k): v for k, v in r.get("kept_per_class", {}).items()})
        dropped.update({int(k): v for k, v in r.get("dropped_per_class", {}).items()})
    rows_in = sum(r.get("rows", 0) for r in results)
    rows_kept = sum(r.get("kept", 0) for r in results)
    return {
        "dataset": spec.name,
        "encoder": cfg.encoder,
        "threshold": cfg.threshold_for(spec.name),
        "files": len(files),
        "bad_files": {r["file"]: r["bad_file"] for r in results if "bad_file" in r},
        "rows_in": rows_in,
        "rows_kept": rows_kept,
        "rows_dropped": rows_in - rows_kept,
        "dropped_blank_caption": sum(r.get("blank_captions", 0) for r in results),
        "per_class": {
            spec.classes[c]: {"kept": int(kept[c]), "dropped": int(dropped[c])}
            for c in range(spec.num_classes)
            if kept[c] or dropped[c]
        },
    }
