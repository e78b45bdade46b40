"""Stage 4: decide which pool images prime the classifier (CLIP-score and transductive filters).

Filters only decide: each writes a decision directory (``decision.parquet`` with uid, label,
score, kept, reason; see :mod:`pipeline.core.embeddings`), so a threshold or ``k`` is re-tuned in
seconds from cached embeddings; :mod:`pipeline.materialise` applies a decision.

- CLIP-score filter (the reference's optional filter): logits = 100 f . T^T with the class
  template heads T; keep a pool image when softmax(logits)[caption label] >= ``min_prob`` and,
  with ``require_agreement``, when the zero-shot prediction equals its caption label. A family
  row (its caption named several candidate classes, not which) first takes the candidate of
  highest logit as its label (zero-shot restricted to the candidates).
- Transductive filter (the reference's): S = F_queries . F_pool^T; each query's ``k`` nearest
  pool images; the subset is the union, each kept image with its best similarity and the number
  of queries that chose it. ``kshot`` restricts each query to pool images of its own
  ground-truth label (the reference's few-shot mode); ``per_class`` restricts it to pool images
  of its zero-shot *predicted* class (argmax of 100 f . T^T), the same idea when test labels
  are unknown, so every class with queries predicted in it gets exactly ``k`` neighbours per
  such query from its own pool images (needs the text embeddings).

Decision rows are in pool order (the embedding stage's sorted shard order) and contain no
timings, so the same inputs and config give byte-identical ``decision.parquet`` and
``meta.json``; timings go to ``stats.json``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.core import embeddings as E
from pipeline.core import fingerprint, io
from pipeline.core.config import to_dict
from pipeline.select.knn import KnnConfig, search, search_grouped

log = logging.getLogger(__name__)

# The decision format's version (pipeline.core.embeddings); another is never reused.
OUTPUT_FORMAT = 1


@dataclass(frozen=True)
class SelectConfig:
    """Settings of the filters (section ``select``, conf/stages/select.yaml).

    CLIP-score: ``min_prob`` (softmax probability of the caption label, 0..1),
    ``require_agreement``, ``logit_scale``. Transductive: ``k`` neighbours per query, ``mode``
    (``global``, ``kshot``, ``per_class``). ``batch``: rows per matrix product / FAISS call.
    The rest are the FAISS settings of :class:`pipeline.select.knn.KnnConfig`.
    """

    min_prob: float = 0.0
    require_agreement: bool = True
    logit_scale: float = 100.0
    k: int = 10
    mode: str = "global"  # global | kshot | per_class
    batch: int = 8192
    exact_max_pool: int = 2_000_000
    nlist: int = 0
    nprobe: int = 0
    target_recall: float = 0.95
    calibration_queries: int = 256
    train_size: int = 200_000
    use_gpu: str = "auto"
    threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.min_prob <= 1.0:
            problems.append("min_prob must be in [0, 1]")
        if self.k < 1:
            problems.append("k must be >= 1")
        if self.batch < 1:
            problems.append("batch must be >= 1")
        if self.mode not in ("global", "kshot", "per_class"):
            problems.append("mode must be global, kshot or per_class")
        try:
            self.knn()
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))

    def knn(self) -> KnnConfig:
        """The FAISS part of this config."""
        return KnnConfig.of(self, query_batch=self.batch)

    def result_settings(self, filter_name: str) -> dict:
        """The settings that can change a filter's decision (written to its meta.json); device
        and thread settings are left out because they do not change the result."""
        if filter_name == "clip":
            keys = ("min_prob", "require_agreement", "logit_scale")
        else:
            keys = (
                "k",
                "mode",
                "exact_max_pool",
                "nlist",
                "nprobe",
                "target_recall",
                "calibration_queries",
                "train_size",
                "seed",
            )
            if self.mode == "per_class":
                keys += ("logit_scale",)
        d = to_dict(self)
        return {k: d[k] for k in keys}


# ---------------------------------------------------------------------- pure cores


def zero_shot(
    feats: np.ndarray,
    heads: np.ndarray,
    logit_scale: float = 100.0,
    batch: int = 8192,
    labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot prediction ``argmax(logit_scale f . T^T)`` and the softmax probability of
    ``labels`` (``[N]`` float32; zeros when ``labels`` is None; 0 for labels outside
    ``[0, C)``). Computed in float32 batches of ``batch`` rows, so memory is ``batch x C``,
    not ``N x C``.
    """
    t = np.asarray(heads, np.float32)
    c = len(t)
    preds = np.empty(len(feats), np.int64)
    prob = np.zeros(len(feats), np.float32)
    lab = None if labels is None else np.asarray(labels, np.int64)
    for s in range(0, len(feats), batch):
        logits = logit_scale * (np.asarray(feats[s : s + batch], np.float32) @ t.T)
        preds[s : s + batch] = np.argmax(logits, axis=1)
        if lab is None:
            continue
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        p = e / e.sum(axis=1, keepdims=True)
        lb = lab[s : s + batch]
        ok = (lb >= 0) & (lb < c)
        prob[s : s + batch] = np.where(
            ok, p[np.arange(len(lb)), np.clip(lb, 0, max(c - 1, 0))], 0.0
        )
    return preds, prob


def choose_among_candidates(
    labels: np.ndarray,
    feats: np.ndarray,
    heads: np.ndarray,
    candidates: dict[int, list[int]],
    logit_scale: float = 100.0,
) -> np.ndarray:
    """``labels`` with each family row's (``candidates``: row -> its candidate classes) set to
    the candidate of highest logit, ``argmax_{c in candidates} f . t_c`` (candidates outside
    the heads ignored; a row with none in them keeps its label)."""
    out = np.array(labels, dtype=np.int64, copy=True)
    if not candidates:
        return out
    rows = np.array(sorted(candidates), dtype=np.int64)
    c = len(heads)
    allowed = np.zeros((len(rows), c), dtype=bool)
    for k, r in enumerate(rows.tolist()):
        cs = [x for x in candidates[r] if 0 <= x < c]
        allowed[k, cs] = True
    logits = logit_scale * (np.asarray(feats[rows], np.float32) @ np.asarray(heads, np.float32).T)
    logits = np.where(allowed, logits, -np.inf)
    some = allowed.any(axis=1)
    out[rows[some]] = np.argmax(logits[some], axis=1)
    return out


def clip_score_decision(
    uids: np.ndarray,
    labels: np.ndarray,
    feats: np.ndarray,
    heads: np.ndarray,
    cfg: SelectConfig,
    candidates: dict[int, list[int]] | None = None,
) -> pa.Table:
    """The CLIP-score rule over a pool: one row per pool image, in pool order.

    ``candidates`` (row -> classes): family rows, labelled first by
    :func:`choose_among_candidates`. Columns: uid, label (the chosen class for a family row),
    score (= prob), kept, reason (``kept``, ``label_unknown`` for a label outside the text
    heads, ``label_disagrees``, ``below_min_prob``; the first that applies), pred (zero-shot
    class), prob (softmax probability of the label), pool_label (the caption's label).
    """
    pool_labels = np.asarray(labels, np.int64)
    labels = choose_among_candidates(pool_labels, feats, heads, candidates or {}, cfg.logit_scale)
    preds, prob = zero_shot(feats, heads, cfg.logit_scale, cfg.batch, labels)
    valid = (labels >= 0) & (labels < heads.shape[0])
    agree = preds == labels
    low = prob < cfg.min_prob
    disagree = cfg.require_agreement & ~agree
    kept = valid & ~low & ~disagree
    reason = np.where(
        ~valid,
        "label_unknown",
        np.where(disagree, "label_disagrees", np.where(low, "below_min_prob", "kept")),
    )
    return pa.table(
        {
            "uid": pa.array(list(uids), pa.string()),
            "label": pa.array(labels.astype(np.int32)),
            "score": pa.array(prob),
            "kept": pa.array(kept),
            "reason": pa.array(reason.tolist(), pa.string()),
            "pred": pa.array(preds.astype(np.int32)),
            "prob": pa.array(prob),
            "pool_label": pa.array(pool_labels.astype(np.int32)),
        }
    )


def transductive_choose(
    q_feats: np.ndarray,
    q_groups: np.ndarray | None,
    p_feats: np.ndarray,
    p_labels: np.ndarray,
    k: int,
    knn_cfg: KnnConfig,
    info: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For every query its ``k`` nearest pool rows (within its group when ``q_groups`` is given:
    only pool rows whose label equals the query's group). Returns per pool row ``(best
    similarity float32, number of queries that chose it int64)``; best is ``-inf`` for
    unchosen rows. ``info`` receives the search's index details (see :func:`pipeline.select.knn.search`).
    """
    if q_groups is None:
        scores, idx = search(q_feats, p_feats, k, knn_cfg, info)
    else:
        scores, idx = search_grouped(q_feats, q_groups, p_feats, p_labels, k, knn_cfg, info)
    best = np.full(len(p_feats), -np.inf, np.float32)
    count = np.zeros(len(p_feats), np.int64)
    ok = idx >= 0
    np.maximum.at(best, idx[ok], scores[ok])
    np.add.at(count, idx[ok], 1)
    return best, count


def transductive_decision(
    uids: np.ndarray, labels: np.ndarray, best: np.ndarray, count: np.ndarray
) -> pa.Table:
    """One row per pool image in pool order: kept when at least one query chose it; score and
    best_sim are its best similarity (NaN when not kept), n_queries how many queries chose it."""
    kept = count > 0
    score = np.where(kept, best, np.nan).astype(np.float32)
    return pa.table(
        {
            "uid": pa.array(list(uids), pa.string()),
            "label": pa.array(np.asarray(labels, np.int32)),
            "score": pa.array(score),
            "kept": pa.array(kept),
            "reason": pa.array(np.where(kept, "kept", "not_in_topk").tolist(), pa.string()),
            "best_sim": pa.array(score),
            "n_queries": pa.array(count.astype(np.int32)),
        }
    )


def decision_stats(table: pa.Table, num_classes: int, classnames: list[str] | None = None) -> dict:
    """Kept/dropped counts, drop reasons, per class kept counts and the classes left empty
    (named by ``classnames`` when it has one name per class, else by index)."""
    labels = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    kept = table.column("kept").to_numpy(zero_copy_only=False).astype(bool)
    reasons = Counter(table.column("reason").to_pylist())
    ok = kept & (labels >= 0) & (labels < num_classes)
    per = np.bincount(labels[ok], minlength=num_classes) if num_classes else np.zeros(0, np.int64)
    name = (lambda c: classnames[c]) if classnames and len(classnames) == num_classes else str
    return {
        "pool": int(len(labels)),
        "kept": int(kept.sum()),
        "dropped": int((~kept).sum()),
        "reasons": dict(sorted(reasons.items())),
        "per_class_kept": {name(c): int(per[c]) for c in range(num_classes)},
        "empty_classes": [name(c) for c in range(num_classes) if per[c] == 0],
    }


# ---------------------------------------------------------------------- shells


def _pool(url: str) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(original pool URL, uids, labels, feats) of an embedding or decision directory; for a
    decision, its kept rows of the pool it decided over."""
    uids, labels, feats = E.load(url)
    return (E.decision_pool(url) if E.is_decision(url) else url), uids, labels, feats


def _check_dims(what: dict[str, np.ndarray]) -> None:
    dims = {name: a.shape[1] for name, a in what.items() if a.ndim == 2 and len(a)}
    if len(set(dims.values())) > 1:
        raise io.InputError(
            f"embedding dimensions differ: {dims}; were they made with the same model?"
        )


def _num_classes(text_url: str | None, labels: np.ndarray) -> tuple[int, list[str] | None]:
    if text_url:
        meta = E.read_meta(text_url)
        return int(meta["num_classes"]), list(meta.get("classnames") or []) or None
    return (int(labels.max()) + 1 if len(labels) else 0), None


def run_clip_filter(
    cfg: SelectConfig, pool: str, text: str, out: str, overwrite: bool = False
) -> dict:
    """Write the CLIP-score decision over ``pool`` (embeddings or a decision) to ``out``.

    Returns the stats (also in ``out/stats.json``); skips a complete ``out`` unless
    ``overwrite``. Raises :class:`pipeline.core.io.InputError` for incomplete inputs or mismatched
    embedding dimensions.
    """
    fp = fingerprint.make(
        "clip-filter",
        OUTPUT_FORMAT,
        cfg.result_settings("clip"),
        {"pool": fingerprint.input_identity(pool), "text": fingerprint.input_identity(text)},
    )
    if not fingerprint.prepare(out, fp, overwrite):
        return io.read_json(io.join(out, "stats.json"))
    t0 = time.perf_counter()
    E.check_same_model({"pool": pool, "text": text})
    root, uids, labels, feats = _pool(pool)
    te = E.load_text(text)
    heads = te.heads("template")
    _check_dims({pool: feats, text: heads})
    family = E.pool_candidates(root)
    cands = (
        {
            i: family[(u, int(lb))]
            for i, (u, lb) in enumerate(zip(uids.tolist(), labels.tolist()))
            if (u, int(lb)) in family
        }
        if family
        else {}
    )
    t1 = time.perf_counter()
    table = clip_score_decision(uids, labels, feats, heads, cfg, cands)
    t2 = time.perf_counter()
    stats = decision_stats(table, te.num_classes, list(te.classnames))
    stats["family_rows"] = len(cands)  # labelled by zero-shot among their candidates
    meta = {
        "filter": "clip",
        "pool": root,
        "input": pool,
        "text": text,
        "config": cfg.result_settings("clip"),
    }
    stats["seconds"] = {"read": round(t1 - t0, 3), "compute": round(t2 - t1, 3)}
    E.write_decision(out, table, meta, stats)
    log.info("clip filter: kept %d of %d (%s)", stats["kept"], stats["pool"], stats["reasons"])
    return stats


def run_transductive(
    cfg: SelectConfig,
    pool: str,
    queries: str,
    out: str,
    text: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Write the transductive decision (union of each query's ``cfg.k`` nearest pool images)
    over ``pool`` (embeddings or a decision to start from) to ``out``.

    ``text`` (class prompt embeddings) is required by ``mode='per_class'`` and otherwise only
    names the classes in the stats. Returns the stats (with the FAISS index used, under
    ``knn``); skips a complete ``out`` unless ``overwrite``. Raises
    :class:`pipeline.core.io.InputError` for missing/incomplete inputs or mismatched dimensions.
    """
    if cfg.mode == "per_class" and not text:
        raise io.InputError(
            "transductive --per-class needs --text (class prompt embeddings) to predict the query classes"
        )
    inputs = {"pool": pool, "queries": queries, **({"text": text} if text else {})}
    fp = fingerprint.make(
        "transductive",
        OUTPUT_FORMAT,
        cfg.result_settings("transductive"),
        {k: fingerprint.input_identity(v) for k, v in inputs.items()},
    )
    if not fingerprint.prepare(out, fp, overwrite):
        return io.read_json(io.join(out, "stats.json"))
    t0 = time.perf_counter()
    E.check_same_model({"pool": pool, "queries": queries, "text": text})
    root, uids, labels, feats = _pool(pool)
    _, q_labels, q_feats = E.load(queries)
    heads = E.load_text(text).heads("template") if cfg.mode == "per_class" else None
    _check_dims({pool: feats, queries: q_feats, **({text: heads} if heads is not None else {})})
    t1 = time.perf_counter()
    groups = None
    if cfg.mode == "kshot":
        groups = q_labels
    elif cfg.mode == "per_class":
        groups, _ = zero_shot(q_feats, heads, cfg.logit_scale, cfg.batch)
    info: dict = {}
    best, count = transductive_choose(q_feats, groups, feats, labels, cfg.k, cfg.knn(), info)
    table = transductive_decision(uids, labels, best, count)
    t2 = time.perf_counter()
    n_classes, names = _num_classes(text, np.concatenate([labels, q_labels]))
    stats = decision_stats(table, n_classes, names)
    stats.update({"queries": int(len(q_feats)), "k": cfg.k, "mode": cfg.mode, "knn": info})
    stats["seconds"] = {"read": round(t1 - t0, 3), "compute": round(t2 - t1, 3)}
    meta = {
        "filter": "transductive",
        "pool": root,
        "input": pool,
        "queries": queries,
        "config": cfg.result_settings("transductive"),
    }
    E.write_decision(out, table, meta, stats)
    log.info(
        "transductive: %d queries x k=%d (%s) kept %d of %d pool images",
        len(q_feats),
        cfg.k,
        cfg.mode,
        stats["kept"],
        stats["pool"],
    )
    return stats
