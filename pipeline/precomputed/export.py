"""``primer export-embeddings``: Primer's embedding format -> the clip-retrieval layout, so
clip-retrieval's and autofaiss's tools can index and browse a priming set.

Each non-empty shard ``S`` becomes ``img_emb/img_emb_<i>.npy`` (``export_dtype``) and
``metadata/metadata_<i>.parquet`` (``url``, ``caption``, ``uid``, ``label``, then the shard's
other columns), ``<i>`` numbered in shard order and zero-padded as clip-retrieval pads
(``int(log10(n)) + 1`` digits). Empty shards are left out: embedding-reader skips an empty
``.npy`` but not its metadata file, which would shift every later pair. Shards without url and
caption (``primer embed`` output) take them from ``--matches`` by uid, else they are null.
``meta.json`` (the model) is copied beside the two folders.
"""

from __future__ import annotations

import io as _io
import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import embeddings as E
from pipeline.core import fingerprint, io
from pipeline.precomputed.config import OUTPUT_FORMAT, PrecomputedConfig

log = logging.getLogger(__name__)

FRONT = ("url", "caption", "uid", "label")


def metadata_table(shard: pa.Table, lookup: pa.Table | None) -> pa.Table:
    """A shard's metadata in clip-retrieval's column order: url, caption, uid, label, then the
    rest. Missing url/caption come from ``lookup`` (uid, url, caption; first row per uid) or
    are null."""
    n = shard.num_rows
    cols = {}
    for c in ("url", "caption"):
        if c in shard.column_names:
            cols[c] = shard.column(c)
        elif lookup is not None:
            at = pc.index_in(shard.column("uid"), value_set=lookup.column("uid"))
            cols[c] = lookup.column(c).take(at)
        else:
            cols[c] = pa.nulls(n, pa.string())
    cols["uid"] = shard.column("uid")
    cols["label"] = shard.column("label")
    for c in shard.column_names:
        if c not in FRONT:
            cols[c] = shard.column(c)
    return pa.table(cols)


def _lookup(matches: str) -> pa.Table:
    t = io.read_parquet(matches, columns=["uid", "url", "caption"])
    first = t.append_column("_i", pa.array(np.arange(t.num_rows)))
    keep = first.group_by("uid", use_threads=False).aggregate([("_i", "min")]).column("_i_min")
    return t.take(pa.array(np.sort(keep.to_numpy())))


def export_embeddings(
    cfg: PrecomputedConfig, src: str, out: str, matches: str | None = None, overwrite: bool = False
) -> dict:
    """Write the embeddings at ``src`` in the clip-retrieval layout under ``out``; returns the
    stats (files, rows, url-less rows). Raises :class:`pipeline.core.io.InputError` for an
    incomplete ``src``."""
    if not io.is_done(src):
        raise io.InputError(f"{src} is not a complete embedding output (no {io.SUCCESS})")
    fp = fingerprint.make(
        "export-embeddings",
        OUTPUT_FORMAT,
        {"export_dtype": cfg.export_dtype},
        {
            "src": fingerprint.input_identity(src),
            **({"matches": fingerprint.input_identity(matches)} if matches else {}),
        },
    )
    if not fingerprint.prepare(out, fp, overwrite):
        return io.read_json(io.join(out, "stats.json"))
    lookup = _lookup(matches) if matches else None
    shards = [
        s
        for s in E.completed_shards(src)
        if io.read_json(io.join(src, f"{s}.done")).get("rows", 1) > 0
    ]
    digits = int(math.log10(len(shards))) + 1 if shards else 1
    rows = no_url = 0
    for i, s in enumerate(shards):
        table = io.read_parquet(io.join(src, f"{s}.parquet"))
        feats = np.load(_io.BytesIO(io.read_bytes(io.join(src, f"{s}.npy"))), allow_pickle=False)
        if feats.shape[0] != table.num_rows:
            raise io.InputError(f"{src}/{s}: {table.num_rows} rows but {feats.shape[0]} embeddings")
        meta = metadata_table(table, lookup)
        name = str(i).zfill(digits)
        buf = _io.BytesIO()
        np.save(buf, feats.astype(cfg.export_dtype), allow_pickle=False)
        io.write_bytes(io.join(out, "img_emb", f"img_emb_{name}.npy"), buf.getvalue())
        io.write_parquet(meta, io.join(out, "metadata", f"metadata_{name}.parquet"))
        rows += table.num_rows
        no_url += meta.column("url").null_count
    if no_url:
        log.warning("export: %d rows have no url (pass --matches to fill url and caption)", no_url)
    io.write_json(io.join(out, E.META), {**E.read_meta(src), "exported_from": src})
    stats = {"files": len(shards), "rows": rows, "rows_without_url": no_url}
    io.write_json(io.join(out, "stats.json"), stats)
    io.mark_done(out, stats)
    return stats
