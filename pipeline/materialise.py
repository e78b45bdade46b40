"""Stage 5: apply a decision: copy the kept images out of the download shards.

Formats: ``webdataset`` (``{00000..}.tar`` with jpg/txt/json per sample) or ``imagefolder``
(``<label:04d>_<class>/<uid>.<ext>``); both with ``manifest.parquet`` (uid, label, class_name,
caption, score, reason) and ``_SUCCESS``. Input member names are untrusted: samples are read
as data from the tar stream and written under names built from their uid, never extracted by
their own names, so ``../`` in a shard cannot escape the output.
"""

from __future__ import annotations

import argparse
import io as _io
import json
import logging
import re
import sys
import tarfile
import time

import pyarrow as pa

from pipeline import embeddings as E
from pipeline import io
from pipeline.config import stage_config

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def safe_name(text: str, max_len: int = 80) -> str:
    """A class name as a single, portable path component."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "class"
    return s[:max_len]


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes for the same input
    info.mode = 0o644
    tf.addfile(info, _io.BytesIO(data))


def run_materialise(decision: str, shards: str, out: str, fmt: str = "webdataset", samples_per_shard: int = 10000, overwrite: bool = False) -> dict:
    """Write the kept images of ``decision`` from ``shards`` to ``out``; returns stats."""
    from tqdm import tqdm

    from pipeline.embed import iter_tar_samples

    if fmt not in ("webdataset", "imagefolder"):
        raise io.InputError(f"format must be webdataset or imagefolder, not {fmt!r}")
    if not io.prepare_output(out, overwrite):
        return io.read_json(io.join(out, "stats.json"))
    t0 = time.perf_counter()
    table = E.read_decision(decision)
    kept = table.filter(table.column("kept"))
    info = {r["uid"]: r for r in kept.select(["uid", "label", "score", "reason"]).to_pylist()}
    manifest: dict[str, list] = {k: [] for k in ("uid", "label", "class_name", "caption", "score", "reason", "path")}
    writer, buf, shard_i, in_shard = None, None, 0, 0

    def flush():
        nonlocal writer, buf, shard_i, in_shard
        if writer is not None:
            writer.close()
            io.write_bytes(io.join(out, f"{shard_i:05d}.tar"), buf.getvalue())
            shard_i += 1
            writer, buf, in_shard = None, None, 0

    seen: set[str] = set()
    tars = io.list_files(shards, suffixes=(".tar",))
    for tar_url in tqdm(tars, desc="materialise", unit="shard", disable=None):
        for _key, sample in iter_tar_samples(tar_url):
            try:
                meta = json.loads(sample.get("json", b"{}"))
            except ValueError:
                continue
            uid = meta.get("uid")
            if uid not in info or uid in seen:
                continue
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None:
                continue
            seen.add(uid)
            row = info[uid]
            caption = sample.get("txt", b"").decode("utf-8", "replace")
            class_name = str(meta.get("class_name", row["label"]))
            if fmt == "webdataset":
                if writer is None:
                    buf = _io.BytesIO()
                    writer = tarfile.open(fileobj=buf, mode="w")
                _tar_add(writer, f"{uid}.{ext}", sample[ext])
                _tar_add(writer, f"{uid}.txt", caption.encode("utf-8"))
                _tar_add(writer, f"{uid}.json", json.dumps({**meta, "score": row["score"], "reason": row["reason"]}, sort_keys=True).encode())
                path = f"{shard_i:05d}.tar/{uid}.{ext}"
                in_shard += 1
                if in_shard >= samples_per_shard:
                    flush()
            else:
                path = f"{int(row['label']):04d}_{safe_name(class_name)}/{uid}.{ext}"
                io.write_bytes(io.join(out, path), sample[ext])
            manifest["uid"].append(uid)
            manifest["label"].append(int(row["label"]))
            manifest["class_name"].append(class_name)
            manifest["caption"].append(caption)
            manifest["score"].append(row["score"])
            manifest["reason"].append(row["reason"])
            manifest["path"].append(path)
    flush()
    schema = pa.schema([("uid", pa.string()), ("label", pa.int32()), ("class_name", pa.string()), ("caption", pa.string()), ("score", pa.float32()), ("reason", pa.string()), ("path", pa.string())])
    io.write_parquet(pa.table(manifest, schema=schema), io.join(out, "manifest.parquet"))
    missing = len(info) - len(seen)
    stats = {"kept_in_decision": len(info), "written": len(seen), "missing_from_shards": missing, "format": fmt, "seconds": round(time.perf_counter() - t0, 3)}
    io.write_json(io.join(out, "stats.json"), stats)
    io.mark_done(out, stats)
    if missing:
        log.warning("materialise: %d kept uids were not found in %s", missing, shards)
    log.info("materialise: %d images -> %s (%s)", len(seen), out, fmt)
    return stats


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("materialise", parents=[common], help="stage 5: write the kept images as webdataset shards or an ImageFolder", description=__doc__.split("\n\n")[0])
    p.add_argument("--decision", required=True, help="a decision directory (clip-filter or transductive)")
    p.add_argument("--shards", required=True, help="the download stage's shards")
    p.add_argument("--out", required=True, help="output directory URL")
    p.add_argument("--format", choices=["webdataset", "imagefolder"], default="webdataset")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from pipeline.download import DownloadConfig

    per_shard = stage_config(DownloadConfig, "download", args.config, args.overrides).samples_per_shard
    s = run_materialise(args.decision, args.shards, args.out, args.format, per_shard, args.overwrite)
    sys.stdout.write(f"{s['written']} images -> {args.out}\n")
    return 0
