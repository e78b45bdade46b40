"""``primer knn-retrieve``: the ``k`` nearest rows of an embedding folder for each class prompt
(``embed-text`` output: the zero-shot head, each class's template prompts averaged and
normalised) or each task image (a task embedding directory), written as candidate rows in the
matches' schema (``source`` = ``knn-text`` / ``knn-image``), so download, import and the filters
take them as they take text matches.

The search (:mod:`pipeline.precomputed.search`) is exact up to ``exact_max_rows`` rows (the
folder is its own exact index: nothing is saved) and IVF-PQ above, whose index is saved as
``<out>/_index/index.faiss`` with ``index.faiss.json`` (the folder it indexes, nprobe) and read
back when ``--source`` names it; a foreign index (autofaiss's) is read with ``--folder`` (its ids
are positions in the folder's order). GPUs are used where the installed faiss (``faiss-gpu``,
the ``gpu`` extra) has them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.core import embeddings as E
from pipeline.core import fingerprint, io
from pipeline.core.config import load_dataset, to_dict
from pipeline.precomputed.config import OUTPUT_FORMAT, RETRIEVE_SETTINGS, PrecomputedConfig
from pipeline.precomputed.gather import unit_rows
from pipeline.precomputed.layout import Folder, open_folder, read_metadata
from pipeline.precomputed.search import read_index, retrieve, save_index

log = logging.getLogger(__name__)

INDEX_DIR = "_index"
INDEX_FILE = "index.faiss"
PART = "part-00000.parquet"


@dataclass
class Queries:
    """Unit query vectors ``feats`` [Q, D] float32 with their ``labels``, ``names`` (class name
    or image uid) and ``kind`` (``knn-text`` or ``knn-image``)."""

    feats: np.ndarray
    labels: np.ndarray
    names: list[str]
    kind: str
    url: str


def load_queries(url: str, classnames: list[str] | None = None) -> tuple[Queries, list[str] | None]:
    """Class-prompt embeddings (one query per class: its zero-shot head; a class without a
    template prompt is skipped with a warning) or task image embeddings (one per image).
    Returns the queries and the class names (from the text embeddings, or ``classnames``)."""
    if E.read_meta(url).get("kind") == "text":
        te = E.load_text(url)
        heads = te.heads("template")
        keep = np.flatnonzero(np.linalg.norm(heads, axis=1) > 0)
        if len(keep) < len(heads):
            log.warning(
                "%s: %d classes have no template prompt; no queries for them",
                url,
                len(heads) - len(keep),
            )
        names = list(te.classnames) or [str(c) for c in range(te.num_classes)]
        q = Queries(heads[keep], keep.astype(np.int64), [names[c] for c in keep], "knn-text", url)
        return q, names
    uids, labels, feats = E.load(url)
    q = Queries(unit_rows(feats)[0], labels, [str(u) for u in uids], "knn-image", url)
    return q, classnames


def group_hits(
    labels: np.ndarray, scores: np.ndarray, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One row per (folder row, label) over every query's neighbours (``scores``/``ids``
    [Q, k], ``-1`` = none; ``labels`` [Q]): ``(ids, labels, best score, queries that chose it,
    the best query)`` sorted by label, score desc, row (ties to the lower query)."""
    q = np.repeat(np.arange(len(labels)), ids.shape[1])
    i, s = ids.ravel(), scores.ravel()
    ok = i >= 0
    q, i, s = q[ok], i[ok], s[ok]
    lab = np.asarray(labels, np.int64)[q]
    order = np.lexsort((q, -s, i, lab))  # by (label, row), best score then lower query first
    q, i, s, lab = q[order], i[order], s[order], lab[order]
    head = np.ones(len(i), bool)
    head[1:] = (i[1:] != i[:-1]) | (lab[1:] != lab[:-1])
    starts = np.flatnonzero(head)
    count = np.diff(np.append(starts, len(i)))
    gi, gl, gs, gq = i[starts], lab[starts], s[starts], q[starts]
    final = np.lexsort((gi, -gs, gl))
    return gi[final], gl[final], gs[final], count[final], gq[final]


# ---------------------------------------------------------------------- the stage


def candidate_table(
    folder: Folder, q: Queries, scores: np.ndarray, ids: np.ndarray, classnames: list[str] | None
) -> tuple[pa.Table, int]:
    """The neighbours as candidate rows in the matches' schema (one per folder row and label),
    and the number dropped for having no URL (nothing to download)."""
    gi, gl, gs, gc, gq = group_hits(q.labels, scores, ids)
    pos, rows = folder.locate(gi)
    urls: list = [None] * len(gi)
    caps: list = [None] * len(gi)
    for p in np.unique(pos).tolist():
        f = folder.files[p]
        sel = np.flatnonzero(pos == p)
        cols = [f.url_col] + ([f.caption_col] if f.caption_col else [])
        t = read_metadata(f, cols, rows[sel])
        for j, u in zip(sel.tolist(), t.column(0).to_pylist()):
            urls[j] = u
        if f.caption_col:
            for j, c in zip(sel.tolist(), t.column(1).to_pylist()):
                caps[j] = c
    ok = np.array([bool(u) for u in urls], bool)
    sel = np.flatnonzero(ok)
    names = classnames or []
    lab = gl[sel]
    table = pa.table(
        {
            "uid": pa.array([io.make_uid(urls[j], caps[j]) for j in sel], pa.string()),
            "url": pa.array([urls[j] for j in sel], pa.string()),
            "caption": pa.array([caps[j] for j in sel], pa.string()),
            "label": pa.array(lab.astype(np.int32)),
            "class_name": pa.array(
                [names[c] if 0 <= c < len(names) else None for c in lab.tolist()], pa.string()
            ),
            "matched_term": pa.nulls(len(sel), pa.string()),
            "source_file": pa.array([folder.files[p].meta for p in pos[sel].tolist()], pa.string()),
            "source_row": pa.array(rows[sel], pa.int64()),
            "score": pa.array(gs[sel].astype(np.float32)),
            "source": pa.array([q.kind] * len(sel), pa.string()),
            "n_queries": pa.array(gc[sel].astype(np.int32)),
            "query": pa.array([q.names[i] for i in gq[sel].tolist()], pa.string()),
        }
    )
    return table, int((~ok).sum())


def open_source(
    source: str, cfg: PrecomputedConfig, folder_root: str | None = None
) -> tuple[Folder, object, dict | None]:
    """``(folder, index or None, sidecar or None)`` of ``--source``: a folder root, or a FAISS
    index file (with the ``.json`` sidecar this stage writes, or ``folder_root`` for a foreign
    index whose ids are positions in the folder's order).

    Raises :class:`pipeline.core.io.InputError` when the index does not fit the folder.
    """
    fs, path = io.url_to_fs(source)
    if not (fs.exists(path) and fs.isfile(path)):
        return open_folder(source, cfg), None, None
    sidecar = io.read_json(source + ".json") if io.exists(source + ".json") else None
    if sidecar is None and not folder_root:
        raise io.InputError(
            f"{source}: a FAISS index without its {source}.json (written by knn-retrieve) needs "
            "--folder ROOT, the embedding folder it indexes (its ids are that folder's rows in order)"
        )
    if sidecar is not None:
        from dataclasses import replace

        cfg = replace(cfg, emb_glob=sidecar["emb_glob"], meta_glob=sidecar["meta_glob"])
    folder = open_folder(folder_root or sidecar["folder"]["root"], cfg)
    if sidecar is not None and sidecar["folder"]["files"] != folder.fingerprint()["files"]:
        raise io.InputError(
            f"{source} was built over other files than {folder.root} holds now; rebuild it "
            "(knn-retrieve with --source ROOT)"
        )
    index = read_index(source)
    if index.ntotal != folder.rows or index.d != folder.dim:
        raise io.InputError(
            f"{source} holds {index.ntotal} vectors of dim {index.d} but {folder.root} has "
            f"{folder.rows} rows of dim {folder.dim}: not an index of this folder"
        )
    return folder, index, sidecar


def run_knn_retrieve(
    cfg: PrecomputedConfig,
    source: str,
    queries: str,
    out: str,
    folder_root: str | None = None,
    dataset: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Write the ``cfg.k`` nearest folder rows of every query as candidate rows to ``out``
    (``part-00000.parquet``, ``_stats.json``, ``_config.json``, ``_SUCCESS``; a built index in
    ``_index/``). ``dataset`` names the classes of image queries. Returns the stats.

    Raises :class:`pipeline.core.io.InputError` for a bad folder or index, queries of another
    dimension or model, or incomplete queries.
    """
    fp = fingerprint.make(
        "knn-retrieve",
        OUTPUT_FORMAT,
        fingerprint.result_settings(cfg, RETRIEVE_SETTINGS),
        {
            "source": fingerprint.file_identity(source),
            "queries": fingerprint.input_identity(queries),
            **({"folder": fingerprint.file_identity(folder_root)} if folder_root else {}),
        },
        dataset=load_dataset(dataset, descriptions=False).identity("classes") if dataset else None,
    )
    if not fingerprint.prepare(out, fp, overwrite):
        return io.read_json(io.join(out, "_stats.json"))
    t0 = time.perf_counter()
    names = list(load_dataset(dataset, descriptions=False).classes) if dataset else None
    q, names = load_queries(queries, names)
    if cfg.model:
        E.check_same_model(
            {"queries": queries, source: {"model": cfg.model, "pretrained": cfg.pretrained or None}}
        )
    folder, index, sidecar = open_source(source, cfg, folder_root)
    if len(q.feats) and q.feats.shape[1] != folder.dim:
        raise io.InputError(
            f"{queries} has dimension {q.feats.shape[1]} but {folder.root} has {folder.dim}: "
            "embed the queries with the folder's model"
        )
    t1 = time.perf_counter()
    scores, ids, info, cpu = retrieve(folder, q.feats, cfg.k, cfg, index, sidecar)
    t2 = time.perf_counter()
    if index is None and cpu is not None and info["index"] == "ivfpq":
        sidecar = {
            "folder": folder.fingerprint(),
            "emb_glob": cfg.emb_glob,
            "meta_glob": cfg.meta_glob,
            **{k: v for k, v in info.items() if k != "gpus"},
        }
        save_index(cpu, io.join(out, INDEX_DIR, INDEX_FILE), sidecar)
    table, no_url = candidate_table(folder, q, scores, ids, names)
    io.write_parquet(table, io.join(out, PART))
    per_class = np.bincount(table.column("label").to_numpy(), minlength=len(names or []))
    stats = {
        "source": q.kind,
        "queries": len(q.feats),
        "k": cfg.k,
        "candidates": table.num_rows,
        "dropped_no_url": no_url,
        "folder_rows": folder.rows,
        "per_class": {
            (names[c] if names and c < len(names) else str(c)): int(v)
            for c, v in enumerate(per_class)
        },
        "knn": info,
        "seconds": {
            "open": round(t1 - t0, 3),
            "index_and_search": round(t2 - t1, 3),
            "write": round(time.perf_counter() - t2, 3),
        },
    }
    config = {"source": source, "queries": queries, "folder": folder.root, **to_dict(cfg)}
    io.write_json(io.join(out, "_config.json"), config)
    io.write_json(io.join(out, "_stats.json"), stats)
    io.mark_done(out, {"rows": table.num_rows})
    log.info(
        "knn-retrieve: %d %s queries x k=%d -> %d candidates (%s index) in %.1f s",
        len(q.feats), q.kind, cfg.k, table.num_rows, info.get("index"), time.perf_counter() - t0,
    )  # fmt: skip
    return stats
