"""The on-disk format of embeddings and decisions, and their public loaders.

An embedding directory holds, per shard ``S`` (zero-padded, sorted order is row order)::

    S.npy        float16 [N, D], rows L2-normalised (pool shards: rows sorted by uid)
    S.parquet    uid (string), label (int32), plus optional extra columns
    S.done       per-shard completion marker, written after the two files above
    meta.json    model name, pretrained tag or checkpoint hash, preprocessing, dim, ...
    _SUCCESS     written last, when every shard is done

Text (class prompt) embeddings use the same layout with one shard named ``text`` whose
parquet also carries ``kind`` ("template" or "description") and ``prompt``.

A decision directory (written by the selection stage) holds ``decision.parquet`` (uid, label,
score, kept, reason, ...) and a ``meta.json`` naming the pool embeddings it decided over, so
``load(decision_url)`` returns the kept pool rows.
"""

from __future__ import annotations

import io as _io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import io

log = logging.getLogger(__name__)

META = "meta.json"
# Keys of a decision's meta.json that hold paths (stored relative to the decision).
PATH_KEYS = ("pool", "input", "text", "queries")
DECISION = "decision.parquet"


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by their L2 norm, computed in float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(n, eps)


def shard_done(out_url: str, shard: str) -> bool:
    """True when shard ``shard`` of ``out_url`` was completely written."""
    return io.exists(io.join(out_url, f"{shard}.done"))


def write_shard(
    out_url: str,
    shard: str,
    uids: np.ndarray | list,
    labels: np.ndarray | list,
    feats: np.ndarray,
    extra: Mapping[str, Any] | None = None,
    stats: Mapping[str, Any] | None = None,
) -> None:
    """Write one shard's embeddings atomically, then its ``.done`` marker.

    ``feats`` is cast to float16; its rows must already be L2-normalised (checked loosely).
    ``extra`` adds columns to the shard's parquet; ``stats`` is stored in the marker.
    """
    feats = np.asarray(feats)
    n = len(uids)
    if feats.ndim != 2 or feats.shape[0] != n or len(labels) != n:
        raise ValueError(f"shard {shard}: {n} uids, {len(labels)} labels, feats {feats.shape}")
    if n:
        norms = np.linalg.norm(feats.astype(np.float32), axis=1)
        if not np.all(np.abs(norms - 1) < 1e-2):
            raise ValueError(f"shard {shard}: embeddings are not L2-normalised")
    cols: dict[str, Any] = {
        "uid": pa.array(list(uids), pa.string()),
        "label": pa.array(np.asarray(labels, dtype=np.int32)),
    }
    for k, v in (extra or {}).items():
        cols[k] = v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v)
    io.write_parquet(pa.table(cols), io.join(out_url, f"{shard}.parquet"))
    buf = _io.BytesIO()
    np.save(buf, feats.astype(np.float16), allow_pickle=False)
    io.write_bytes(io.join(out_url, f"{shard}.npy"), buf.getvalue())
    io.write_json(io.join(out_url, f"{shard}.done"), {"rows": n, **(stats or {})})


def completed_shards(url: str) -> list[str]:
    """Names of the shards of ``url`` that have their ``.done`` marker, sorted."""
    fs, path = io.url_to_fs(url)
    if not fs.exists(path):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return sorted(n[: -len(".done")] for n in names if n.endswith(".done"))


def read_meta(url: str) -> dict:
    """The ``meta.json`` of an embedding or decision directory."""
    return io.read_json(io.join(url, META))


def is_decision(url: str) -> bool:
    return io.exists(io.join(url, DECISION))


def model_identity(meta: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``(model name, weights)`` recorded in an embedding ``meta.json``; None where not recorded.

    Weights are the pretrained tag, else ``sha256:<checkpoint hash>``, else ``untrained:<seed>``
    (a tag ``none`` without a recorded seed records no weights).
    """
    weights = None
    if meta.get("pretrained") and str(meta["pretrained"]).lower() != "none":
        weights = str(meta["pretrained"])
    elif meta.get("checkpoint_sha256"):
        weights = f"sha256:{meta['checkpoint_sha256']}"
    elif meta.get("untrained"):
        weights = f"untrained:{meta.get('seed', 0)}"
    return (str(meta["model"]) if meta.get("model") else None), weights


def check_same_model(inputs: Mapping[str, str | Mapping[str, Any] | None]) -> None:
    """Refuse to combine embeddings made by different models.

    ``inputs`` maps a name for messages to an embedding or decision directory (a decision
    stands for the pool it decided over), a ``meta.json`` dict, or None (skipped). Inputs that
    record no model are not compared; weights are compared where both record them.

    Raises :class:`pipeline.core.io.InputError` naming each input's model.
    """
    seen: dict[str, tuple[str | None, str | None]] = {}
    for name, src in inputs.items():
        if src is None:
            continue
        if isinstance(src, str):
            if not io.exists(io.join(src, META)):
                continue
            meta = read_meta(src)
            if "pool" in meta and is_decision(src):
                pool = decision_pool(src)
                if io.exists(io.join(pool, META)):
                    meta = read_meta(pool)
        else:
            meta = src
        ident = model_identity(meta)
        if ident[0] is not None:
            seen[name] = ident
    models = {m for m, _ in seen.values()}
    weights = {w for _, w in seen.values() if w is not None}
    if len(models) > 1 or len(weights) > 1:
        made = ", ".join(f"{n} by {m}" + (f" ({w})" if w else "") for n, (m, w) in seen.items())
        raise io.InputError(
            f"embeddings of different models are mixed: {made}. Similarities across models are "
            "meaningless; embed every input with one model (--model/--pretrained), or import "
            "precomputed embeddings with the --model that made them"
        )


def _load_shard(
    url: str, shard: str, columns: list[str] | None = None
) -> tuple[pa.Table, np.ndarray]:
    table = io.read_parquet(io.join(url, f"{shard}.parquet"), columns=columns)
    feats = np.load(_io.BytesIO(io.read_bytes(io.join(url, f"{shard}.npy"))), allow_pickle=False)
    if feats.shape[0] != table.num_rows:
        raise io.InputError(
            f"{url}/{shard}: {table.num_rows} rows in parquet but {feats.shape[0]} embeddings"
        )
    return table, feats


def load_table(url: str, require_complete: bool = True) -> tuple[pa.Table, np.ndarray]:
    """Every completed shard of an embedding directory: ``(metadata table, float16 feats)``.

    Raises :class:`pipeline.core.io.InputError` when ``require_complete`` and ``_SUCCESS`` is missing.
    """
    if require_complete and not io.is_done(url):
        raise io.InputError(
            f"{url} is not a complete embedding output (no {io.SUCCESS}); run or rerun its embed stage"
        )
    shards = completed_shards(url)
    tables, feats = [], []
    for s in shards:
        t, f = _load_shard(url, s)
        tables.append(t)
        feats.append(f)
    if not tables:
        dim = int(read_meta(url).get("embed_dim", 0)) if io.exists(io.join(url, META)) else 0
        return pa.table(
            {"uid": pa.array([], pa.string()), "label": pa.array([], pa.int32())}
        ), np.zeros((0, dim), np.float16)
    return pa.concat_tables(tables, promote_options="default"), np.concatenate(feats, axis=0)


def load(url: str, require_complete: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load any embedding output as ``(uids, labels, feats)``.

    ``uids`` is an object array of hex strings, ``labels`` int64, ``feats`` float16 ``[N, D]``,
    rows in shard order (stable across reruns). Given a decision directory, returns the kept
    rows of the pool embeddings it was decided over, in pool order.
    """
    if is_decision(url):
        kept = _decision_kept_rows(url)
        uids, labels, feats = load(decision_pool(url), require_complete)
        mask = np.isin(uids, np.asarray(kept.column("uid").to_pylist(), dtype=object))
        return uids[mask], _decided_labels(uids[mask], labels[mask], kept), feats[mask]
    table, feats = load_table(url, require_complete)
    if "kind" in table.column_names and io.exists(io.join(url, META)):
        if read_meta(url).get("kind") == "text":
            raise io.InputError(
                f"{url} holds class prompt embeddings (primer embed-text), not images: give "
                "the images' embeddings (primer embed-pool or embed-task output) here"
            )
    uids = np.asarray(table.column("uid").to_pylist(), dtype=object)
    labels = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    return uids, labels, feats


def decision_pool(url: str) -> str:
    """The pool embeddings a decision was made over (stored relative to the decision, so a run
    directory can move)."""
    return io.resolve(url, read_meta(url)["pool"])


def decision_kept(url: str) -> np.ndarray:
    """The kept uids of a decision directory (object array)."""
    return np.asarray(_decision_kept_rows(url).column("uid").to_pylist(), dtype=object)


def _decision_kept_rows(url: str) -> pa.Table:
    """``uid`` and ``label`` of a decision's kept rows."""
    if not io.is_done(url):
        raise io.InputError(f"{url} is not a complete decision (no {io.SUCCESS}); rerun its filter")
    t = io.read_parquet(io.join(url, DECISION), columns=["uid", "label", "kept"])
    return t.filter(t.column("kept")).select(["uid", "label"])


def _decided_labels(uids: np.ndarray, labels: np.ndarray, kept: pa.Table) -> np.ndarray:
    """``labels`` with the decision's label where it differs: a filter may pick a family row's
    class (the CLIP filter does). Only uids found once in the pool rows and once among the kept
    rows are relabelled (a caption kept under two classes keeps both rows as they are)."""
    import pyarrow.compute as pc

    if not len(uids) or not kept.num_rows:
        return labels
    pool = pa.table({"uid": pa.array(uids.tolist(), pa.string()), "row": np.arange(len(uids))})
    pairs = pool.join(kept.rename_columns(["uid", "decided"]), "uid", join_type="inner")
    g = pairs.group_by("uid").aggregate([("row", "count"), ("row", "min"), ("decided", "min")])
    g = g.filter(pc.equal(g.column("row_count"), 1))
    rows = g.column("row_min").to_numpy()
    out = np.array(labels, dtype=np.int64, copy=True)
    out[rows] = g.column("decided_min").to_numpy()
    return out


def pool_candidates(url: str) -> dict[tuple[str, int], list[int]]:
    """``{(uid, label): classes}`` of an embedding directory's family rows (rows whose caption
    named a family of classes; the ``candidates`` column the embed stage carries), empty when
    it has none."""
    import pyarrow.compute as pc

    out: dict[tuple[str, int], list[int]] = {}
    for s in completed_shards(url):
        t = io.read_parquet(io.join(url, f"{s}.parquet"))  # uid, label and a few small columns
        if "candidates" not in t.column_names:
            continue
        n = pc.fill_null(pc.list_value_length(t.column("candidates")), 0)
        t = t.filter(pc.greater(n, 1))
        for u, lb, c in zip(*(t.column(k).to_pylist() for k in ("uid", "label", "candidates"))):
            if c and len(c) > 1:
                out[(u, int(lb))] = [int(x) for x in c]
    return out


@dataclass(frozen=True)
class TextEmbeddings:
    """Prompt embeddings, one row per prompt: ``labels[i]`` is its class, ``kinds[i]`` is
    ``"template"`` or ``"description"``, ``feats`` float16 ``[P, D]`` unit rows."""

    labels: np.ndarray
    kinds: np.ndarray
    prompts: np.ndarray
    feats: np.ndarray
    num_classes: int
    classnames: tuple[str, ...]

    def heads(self, kind: str = "template") -> np.ndarray:
        """Class weights ``[C, D]`` float32: t_c = norm(mean_j norm(E(prompt_j))) over prompts of
        ``kind``. A class with no prompt of that kind gets a zero row (callers decide the fallback)."""
        mask = self.kinds == kind
        return class_means(self.feats[mask], self.labels[mask], self.num_classes)

    def has(self, kind: str) -> bool:
        return bool(np.any(self.kinds == kind))


def class_means(feats: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, D]`` float32: per class, the L2-normalised sum of L2-normalised rows (zero if none)."""
    f = l2_normalize(feats)
    out = np.zeros((num_classes, f.shape[1] if f.ndim == 2 else 0), dtype=np.float32)
    np.add.at(out, np.asarray(labels, dtype=np.int64), f)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.where(norms > 0, out / np.maximum(norms, 1e-12), 0.0).astype(np.float32)


def load_text(url: str) -> TextEmbeddings:
    """Load class prompt embeddings written by ``primer embed-text``."""
    table, feats = load_table(url)
    meta = read_meta(url)
    return TextEmbeddings(
        labels=table.column("label").to_numpy(zero_copy_only=False).astype(np.int64),
        kinds=np.asarray(table.column("kind").to_pylist(), dtype=object),
        prompts=np.asarray(table.column("prompt").to_pylist(), dtype=object),
        feats=feats,
        num_classes=int(meta["num_classes"]),
        classnames=tuple(meta.get("classnames", ())),
    )


def write_decision(
    out_url: str, table: pa.Table, meta: Mapping[str, Any], stats: Mapping[str, Any]
) -> None:
    """Write a decision directory: parquet, meta, stats, then ``_SUCCESS`` last.

    ``table`` must hold at least uid, label, score, kept, reason. ``meta`` must name the pool
    embeddings (``pool``) it decided over.
    """
    missing = {"uid", "label", "score", "kept", "reason"} - set(table.column_names)
    if missing or "pool" not in meta:
        raise ValueError(
            f"decision needs columns uid,label,score,kept,reason and meta['pool'] (missing {sorted(missing)})"
        )
    io.write_parquet(table, io.join(out_url, DECISION))
    # Paths relative to the decision: a run directory read from elsewhere, or moved, still finds
    # its own pool (never one a relative path would name from the reader's working directory).
    meta = {k: io.relative(v, out_url) if k in PATH_KEYS and v else v for k, v in meta.items()}
    io.write_json(io.join(out_url, META), meta)
    io.write_json(io.join(out_url, "stats.json"), dict(stats))
    io.mark_done(out_url)


def read_decision(url: str) -> pa.Table:
    if not io.is_done(url):
        raise io.InputError(f"{url} is not a complete decision (no {io.SUCCESS})")
    return (
        pq.read_table(io.join(url, DECISION))
        if io.is_local(url)
        else io.read_parquet(io.join(url, DECISION))
    )
