"""Candidate sets in the matches' schema: the union of several sources (text matches,
``knn-text``, ``knn-image``) de-duplicated by URL, and the candidates a decision kept (what is
left to download when selection ran on precomputed embeddings).

Pure cores over Arrow tables (:func:`union_candidates`, :func:`kept_candidates`) and thin shells
that read and write matches directories (:func:`write_union`, :func:`write_kept`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import embeddings as E
from pipeline.core import fingerprint, io
from pipeline.precomputed.config import OUTPUT_FORMAT

log = logging.getLogger(__name__)

SOURCES = ("text", "knn-text", "knn-image")
PART = "part-00000.parquet"


def union_candidates(tables: Mapping[str, pa.Table]) -> tuple[pa.Table, dict]:
    """One row per URL over the sources ``tables`` (source name -> candidate rows), earlier
    sources first (pass them in order of trust: text, knn-text, knn-image), each table's rows in
    its order. The row kept for a URL is its first; ``source`` is that row's source (a table's
    own ``source`` column wins over its name) and ``sources`` lists every source that found
    the URL. Rows without a URL are dropped.

    Returns ``(table, stats)``: stats count rows in and kept per source, URLs found by several
    sources, and such URLs whose sources disagree on the label.
    """
    parts = []
    for name, t in tables.items():
        src = (
            t.column("source")
            if "source" in t.column_names
            else pa.array([name] * t.num_rows, pa.string())
        )
        t = t.drop_columns([c for c in ("source", "sources") if c in t.column_names])
        parts.append(t.append_column("source", pc.cast(src, pa.string())))
    if not parts:
        return pa.table({"uid": pa.array([], pa.string()), "url": pa.array([], pa.string())}), {}
    table = pa.concat_tables(parts, promote_options="permissive")
    has_url = pc.fill_null(pc.greater(pc.binary_length(table.column("url")), 0), False)
    dropped = table.num_rows - pc.sum(has_url).as_py() if table.num_rows else 0
    table = table.filter(has_url)
    urls = table.column("url").combine_chunks()
    codes = pc.dictionary_encode(urls).indices.to_numpy(zero_copy_only=False)
    src = np.asarray(table.column("source").to_pylist(), dtype=object)
    labels = table.column("label").to_numpy(zero_copy_only=False)
    first = np.full(codes.max() + 1 if len(codes) else 0, -1, np.int64)
    order = np.arange(len(codes))[::-1]
    first[codes[order]] = order  # the last write per code is its first row
    found: dict[int, list[str]] = {}
    for c, s in zip(codes.tolist(), src.tolist()):
        found.setdefault(c, [])
        if s not in found[c]:
            found[c].append(s)
    conflicts = int((labels != labels[first[codes]]).sum()) if len(codes) else 0
    kept = np.sort(first)
    out = table.take(pa.array(kept))
    out = out.append_column(
        "sources", pa.array([",".join(found[c]) for c in codes[kept].tolist()], pa.string())
    )
    n_in = Counter(src.tolist())
    stats = {
        "rows_in": {k: int(v) for k, v in n_in.items()},
        "rows_kept": {k: int(v) for k, v in Counter(src[kept].tolist()).items()},
        "urls": int(len(kept)),
        "urls_found_by_several_sources": int(sum(len(v) > 1 for v in found.values())),
        "rows_with_another_label_than_kept": int(conflicts),
        "dropped_no_url": int(dropped),
    }
    return out, stats


def kept_candidates(candidates: pa.Table, kept_uids: np.ndarray) -> pa.Table:
    """The candidate rows whose uid a decision kept, in candidate order."""
    mask = pc.is_in(candidates.column("uid"), value_set=pa.array(list(kept_uids), pa.string()))
    return candidates.filter(mask)


def _write(table: pa.Table, out: str, stats: dict) -> dict:
    io.write_parquet(table, io.join(out, PART))
    io.write_json(io.join(out, "_stats.json"), stats)
    io.mark_done(out, {"rows": table.num_rows})
    return stats


def write_union(sources: Mapping[str, str], out: str, overwrite: bool = False) -> dict:
    """Union the matches directories ``sources`` (name -> URL, in order of trust) into the
    matches directory ``out`` (:func:`union_candidates`); returns its stats."""
    from pipeline.precomputed.importer import read_candidates

    fp = fingerprint.make(
        "candidates",
        OUTPUT_FORMAT,
        {},
        {n: fingerprint.input_identity(u) for n, u in sources.items()},
    )
    if not fingerprint.prepare(out, fp, overwrite):
        return io.read_json(io.join(out, "_stats.json"))
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise io.InputError(f"unknown candidate sources {unknown} (known: {list(SOURCES)})")
    table, stats = union_candidates({n: read_candidates(u) for n, u in sources.items()})
    log.info("candidates: %d URLs from %s", table.num_rows, stats["rows_kept"])
    return _write(table, out, {**stats, "inputs": dict(sources)})


def write_kept(candidates: str, decision: str, out: str, overwrite: bool = False) -> dict:
    """The candidates (a matches directory) that ``decision`` kept, as the matches directory
    ``out`` for the download stage. Stats: ``candidates``, ``kept``, ``downloads_avoided``."""
    from pipeline.precomputed.importer import read_candidates

    inputs = {"candidates": candidates, "decision": decision}
    fp = fingerprint.make(
        "kept-candidates",
        OUTPUT_FORMAT,
        {},
        {k: fingerprint.input_identity(v) for k, v in inputs.items()},
    )
    if not fingerprint.prepare(out, fp, overwrite):
        return io.read_json(io.join(out, "_stats.json"))
    table = read_candidates(candidates)
    kept = kept_candidates(table, E.decision_kept(decision))
    stats = {
        "candidates": table.num_rows,
        "kept": kept.num_rows,
        "downloads_avoided": table.num_rows - kept.num_rows,
        "decision": decision,
    }
    log.info(
        "select before download: %d of %d candidates kept, %d downloads avoided",
        kept.num_rows, table.num_rows, stats["downloads_avoided"],
    )  # fmt: skip
    return _write(kept, out, stats)


def serves_run(embeddings: str, model: str, pretrained: str) -> bool:
    """True when the embeddings at ``embeddings`` were made by the run's ``model`` and
    ``pretrained`` tag, so evaluation can use them and the download can be skipped."""
    m, w = E.model_identity(E.read_meta(embeddings))
    return m == model and w == (pretrained or None)
