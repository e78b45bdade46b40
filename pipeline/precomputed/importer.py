"""``primer import-embeddings``: the precomputed vectors of exactly the matched rows, in Primer's
embedding format (:mod:`pipeline.core.embeddings`: a shard per source file, rows sorted by uid,
L2-normalised float16, with uid, label, url, caption, class_name, source_file, source_row).

Steps: resolve each match to a row (its source columns, else a join on URL over every metadata
file: :mod:`pipeline.precomputed.gather`), then gather each file's rows by byte range and write
its shard, one task per file (threads, or Spark tasks for many files). A match that resolves to
no row, whose row's URL is not its own, or whose vector is unusable is counted by reason and
listed in ``missing.parquet``. ``meta.json`` records the embeddings' model (``--model``), so a
stage mixing them with another model's embeddings fails (:func:`~pipeline.core.embeddings.check_same_model`).

rom1504's ``embedding-reader`` (1.8.1) installs beside our pins but does not serve here: it
reads ``[start, end)`` ranges of the folder in order (no gather by row), pairs ``.npy`` and
metadata files by zipping two sorted lists (a missing file silently shifts every later pair),
takes the first file's dtype and row size for every file (a folder mixing float16 and float32
reads wrong bytes) and reads whole metadata files; this module reads only the rows it needs.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from pipeline.core import embeddings as E
from pipeline.core import fingerprint, io
from pipeline.core.config import to_dict
from pipeline.precomputed.config import IMPORT_SETTINGS, OUTPUT_FORMAT, PrecomputedConfig
from pipeline.precomputed.gather import (
    SOURCE_COLUMNS,
    best_joins,
    gather_file,
    join_on_url,
    resolve_by_source,
)
from pipeline.precomputed.layout import Folder, SourceFile, open_folder, read_metadata

log = logging.getLogger(__name__)

REQUIRED = ("uid", "url", "caption", "label")
# Columns carried from the matches into the shards, when present.
CARRIED = ("url", "caption", "class_name", "source")
MISSING = "missing.parquet"


def read_candidates(matches: str) -> pa.Table:
    """The rows of a matches directory (text filter, ``knn-retrieve`` or a union of them).

    Raises :class:`pipeline.core.io.InputError` for an incomplete directory, no parquet files
    or a missing column.
    """
    if not io.is_done(matches):
        raise io.InputError(f"{matches} is not a complete matches output (no {io.SUCCESS})")
    try:
        table = io.read_parquet(matches)
    except FileNotFoundError:
        raise io.InputError(f"{matches}: no parquet files") from None
    missing = sorted(set(REQUIRED) - set(table.column_names))
    if missing:
        raise io.InputError(f"{matches}: missing columns {missing} (have {table.column_names})")
    return table


# ------------------------------------------------------------------------- tasks


def _run(fn, tasks: list, cfg: PrecomputedConfig, master: str | None, desc: str) -> list:
    """``[fn(t) for t in tasks]``: on threads, or one Spark task each (``engine``)."""
    if not tasks:
        return []
    spark = cfg.engine == "spark" or (cfg.engine == "auto" and len(tasks) > cfg.local_max_files)
    if not spark:
        from tqdm import tqdm

        with ThreadPoolExecutor(cfg.io_threads) as pool:
            return list(tqdm(pool.map(fn, tasks), total=len(tasks), desc=desc, disable=None))
    from pipeline.core.spark import JobProgress, get_spark, task_error_message

    sc = get_spark(master, app_name="primer-import-embeddings").sparkContext
    try:
        with JobProgress(sc, desc, len(tasks)):
            return sc.parallelize(tasks, len(tasks)).map(fn).collect()
    except Exception as e:
        raise io.InputError(task_error_message(e, "import")) from None


def _join_task(t: dict) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    f: SourceFile = t["file"]
    cols = [f.url_col] + ([f.caption_col] if f.caption_col else [])
    meta = read_metadata(f, cols)
    caps = meta.column(f.caption_col) if f.caption_col else None
    idx, rows, exact = join_on_url(meta.column(f.url_col), caps, t["urls"], t["uids"])
    return f.index, idx, rows, exact


def _gather_task(t: dict) -> dict:
    """Gather one file's rows and write its shard (skipped when its ``.done`` exists); returns
    the shard's stats (also in the marker, so a resumed run finds them)."""
    out, name, f = t["out"], t["shard"], t["file"]
    if E.shard_done(out, name):
        return io.read_json(io.join(out, f"{name}.done"))
    sub = pa.ipc.open_stream(t["matches"]).read_all()
    rows = np.asarray(t["rows"], np.int64)
    urls = sub.column("url").to_pylist()
    verify = np.asarray(t["verify"], bool)
    counters: dict = {}
    feats, usable, agree = gather_file(f, rows, urls if verify.any() else None, t["gap"], counters)
    agree |= ~verify
    keep = usable & agree
    reason = np.where(~agree, "url_mismatch", np.where(~usable, "bad_vector", ""))
    kept = sub.filter(pa.array(keep))
    uids = np.asarray(kept.column("uid").to_pylist(), dtype=object)
    order = np.argsort(uids, kind="stable")
    extra = {c: kept.column(c).take(pa.array(order)) for c in CARRIED if c in kept.column_names}
    extra["source_file"] = pa.array([f.meta] * len(order), pa.string())
    extra["source_row"] = pa.array(rows[keep][order], pa.int64())
    labels = kept.column("label").to_numpy(zero_copy_only=False)[order]
    lost = np.flatnonzero(~keep)
    stats = {
        "rows": int(keep.sum()),
        "file": f.emb,
        "requests": counters.get("requests", 0),
        "bytes": counters.get("bytes", 0),
        "lost": [[int(t["index"][i]), str(reason[i])] for i in lost],
    }
    E.write_shard(out, name, uids[order].tolist(), labels, feats[keep][order], extra, stats)
    return stats


# ------------------------------------------------------------------------- the stage


def _fingerprint(matches: str, table: pa.Table, folder: Folder, cfg: PrecomputedConfig) -> str:
    h = hashlib.sha256()
    settings = {k: to_dict(cfg)[k] for k in ("verify_urls", "url_columns", "caption_columns")}
    h.update(json.dumps([matches, folder.fingerprint(), settings], default=str).encode())
    ids = table.select([c for c in ("uid", "label", *SOURCE_COLUMNS) if c in table.column_names])
    sink = _io.BytesIO()
    with pa.ipc.new_stream(sink, ids.schema) as w:
        w.write_table(ids)
    h.update(sink.getvalue())
    return h.hexdigest()


def _check_resume(out: str, digest: str) -> None:
    """Shards of a failed run are reused only when the same matches, folder and settings made
    them; otherwise they are cleared."""
    url = io.join(out, "_import.json")
    if io.exists(url) and io.read_json(url).get("sha256") == digest:
        log.info("import: resuming in %s", out)
        return
    for s in E.completed_shards(out):
        for ext in ("done", "npy", "parquet"):
            io.remove(io.join(out, f"{s}.{ext}"))
    io.write_json(url, {"sha256": digest})


def run_import(
    cfg: PrecomputedConfig,
    source: str,
    matches: str,
    out: str,
    master: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Import the vectors of the rows of ``matches`` from the embedding folder ``source`` into
    ``out`` (Primer's embedding format). Returns the stats (also ``out/stats.json``).

    Raises :class:`pipeline.core.io.InputError` without ``cfg.model``, for a bad folder
    (:func:`~pipeline.precomputed.layout.open_folder`) or bad matches.
    """
    if not cfg.model:
        raise io.InputError(
            "import-embeddings needs the model that made the embeddings: --model NAME "
            "(an open_clip name, e.g. ViT-L-14) and --pretrained TAG (e.g. openai)"
        )
    fp = fingerprint.make(
        "import-embeddings",
        OUTPUT_FORMAT,
        fingerprint.result_settings(cfg, IMPORT_SETTINGS),
        {
            "source": fingerprint.file_identity(source),
            "matches": fingerprint.input_identity(matches, (".parquet",)),
        },
    )
    if not fingerprint.prepare(out, fp, overwrite):
        return io.read_json(io.join(out, "stats.json"))
    t0 = time.perf_counter()
    table = read_candidates(matches)
    folder = open_folder(source, cfg)
    _check_resume(out, _fingerprint(matches, table, folder, cfg))
    pos, rows, why = resolve_by_source(table, folder)
    how = np.where(pos >= 0, "source_row", "").astype(object)
    todo = np.flatnonzero(pos < 0)
    t_join = time.perf_counter()
    if len(todo):
        urls = table.column("url").take(pa.array(todo)).to_pylist()
        uids = table.column("uid").take(pa.array(todo)).to_pylist()
        log.info("import: %d matches without a usable source row: joining on URL", len(todo))
        tasks = [{"file": f, "urls": urls, "uids": uids} for f in folder.files]
        found = _run(_join_task, tasks, cfg, master, "join on url")
        jp, jr, jx = best_joins(len(todo), found)
        pos[todo], rows[todo] = jp, jr
        how[todo] = np.where(jp < 0, "", np.where(jx, "url_caption", "url"))
    t_gather = time.perf_counter()
    width = max(5, len(str(len(folder.files) - 1)))
    tasks = []
    for p in np.unique(pos[pos >= 0]).tolist():
        idx = np.flatnonzero(pos == p)
        sub = table.take(pa.array(idx))
        sink = _io.BytesIO()
        with pa.ipc.new_stream(sink, sub.schema) as w:
            w.write_table(sub)
        tasks.append(
            {
                "out": out,
                "shard": f"{p:0{width}d}",
                "file": folder.files[p],
                "rows": rows[idx],
                "index": idx,
                "matches": sink.getvalue(),
                "verify": (how[idx] == "source_row") & cfg.verify_urls,
                "gap": cfg.gap_bytes,
            }
        )
    results = _run(_gather_task, tasks, cfg, master, "gather rows")
    lost = Counter({"not_in_folder": int((pos < 0).sum())})
    lost_rows = [(int(i), "not_in_folder") for i in np.flatnonzero(pos < 0)]
    for r in results:
        lost.update(reason for _, reason in r["lost"])
        lost_rows += [tuple(x) for x in r["lost"]]
    _write_missing(out, table, lost_rows)
    imported = sum(r["rows"] for r in results)
    touched = sum(folder.files[int(t["shard"])].header.nbytes for t in tasks)
    stats = {
        "matches": table.num_rows,
        "imported": imported,
        "missing": sum(lost.values()),
        "missing_by_reason": {k: v for k, v in sorted(lost.items()) if v},
        "unresolved_source": dict(sorted(why.items())),
        "resolved_by": dict(Counter(h for h in how.tolist() if h)),
        "folder_files": len(folder.files),
        "folder_rows": folder.rows,
        "files_read": len(tasks),
        "requests": sum(r["requests"] for r in results),
        "bytes_read": sum(r["bytes"] for r in results),
        "bytes_in_files_read": touched,
        "seconds": {
            "resolve": round(t_gather - t0, 3),
            "join": round(t_gather - t_join, 3),
            "gather": round(time.perf_counter() - t_gather, 3),
        },
    }
    meta = {
        "model": cfg.model,
        "pretrained": cfg.pretrained or None,
        "checkpoint": None,
        "checkpoint_sha256": None,
        "untrained": False,
        "embed_dim": folder.dim,
        "kind": "image",
        "precomputed": True,
        "source": folder.root,
        "source_dtypes": sorted({f.header.dtype for f in folder.files}),
        "matches": matches,
    }
    io.write_json(io.join(out, E.META), meta)
    io.write_json(
        io.join(out, "config.json"), {"source": source, "matches": matches, **to_dict(cfg)}
    )
    io.write_json(io.join(out, "stats.json"), stats)
    io.mark_done(out, {"rows": imported})
    log.info(
        "import: %d of %d matches imported from %s (%s missing) in %.1f s",
        imported, table.num_rows, folder.root, stats["missing_by_reason"], time.perf_counter() - t0,
    )  # fmt: skip
    return stats


def _write_missing(out: str, table: pa.Table, lost: list[tuple[int, str]]) -> None:
    lost = sorted(lost)
    idx = pa.array([i for i, _ in lost], pa.int64())
    cols = {c: table.column(c).take(idx) for c in ("uid", "label", "url")}
    cols["reason"] = pa.array([r for _, r in lost], pa.string())
    io.write_parquet(pa.table(cols), io.join(out, MISSING))
