"""Stage 4: decide which pool images prime the classifier (CLIP-score and transductive filters).

Filters only decide: each writes a decision directory (``decision.parquet`` with uid, label,
score, kept, reason; see :mod:`pipeline.embeddings`), so a threshold or ``k`` is re-tuned in
seconds from cached embeddings; :mod:`pipeline.materialise` applies a decision.

- CLIP-score filter (the reference's optional filter): logits = 100 f . T^T with the class
  template heads T; keep a pool image when softmax(logits)[caption label] >= ``min_prob`` and,
  with ``require_agreement``, when the zero-shot prediction equals its caption label.
- Transductive filter (the reference's): S = F_queries . F_pool^T; each query's ``k`` nearest
  pool images; the subset is the union, each kept image with its best similarity and the number
  of queries that chose it. ``kshot`` restricts each query to pool images of its own
  ground-truth label (the reference's few-shot mode); ``per_class`` restricts it to pool images
  of its zero-shot *predicted* class (the same idea when test labels are unknown; needs the
  text embeddings).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import embeddings as E
from pipeline import io
from pipeline.config import stage_config, to_dict
from pipeline.knn import KnnConfig, search

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectConfig:
    """Settings of the filters (section ``select``)."""

    min_prob: float = 0.0
    require_agreement: bool = False
    logit_scale: float = 100.0
    k: int = 10
    mode: str = "global"  # global | kshot | per_class
    batch: int = 8192
    exact_max_pool: int = 2_000_000
    nlist: int = 0
    nprobe: int = 32
    use_gpu: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.min_prob <= 1.0:
            problems.append("min_prob must be in [0, 1]")
        if self.k < 1:
            problems.append("k must be >= 1")
        if self.mode not in ("global", "kshot", "per_class"):
            problems.append("mode must be global, kshot or per_class")
        if self.use_gpu not in ("auto", "yes", "no"):
            problems.append("use_gpu must be auto, yes or no")
        if problems:
            raise ValueError("; ".join(problems))

    def knn(self) -> KnnConfig:
        return KnnConfig(exact_max_pool=self.exact_max_pool, nlist=self.nlist, nprobe=self.nprobe, use_gpu=self.use_gpu, seed=self.seed)


# ---------------------------------------------------------------------- pure cores


def zero_shot(feats: np.ndarray, heads: np.ndarray, logit_scale: float = 100.0, batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted class [N], softmax probabilities [N, C] float32)`` of ``logit_scale f . T^T``."""
    t = np.asarray(heads, np.float32)
    preds = np.empty(len(feats), np.int64)
    probs = np.empty((len(feats), len(t)), np.float32)
    for s in range(0, len(feats), batch):
        logits = logit_scale * (np.asarray(feats[s : s + batch], np.float32) @ t.T)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        p = e / e.sum(axis=1, keepdims=True)
        probs[s : s + batch] = p
        preds[s : s + batch] = np.argmax(p, axis=1)
    return preds, probs


def clip_score_decision(uids: np.ndarray, labels: np.ndarray, feats: np.ndarray, heads: np.ndarray, cfg: SelectConfig) -> pa.Table:
    """The CLIP-score rule over a pool: one row per pool image, in pool order."""
    preds, probs = zero_shot(feats, heads, cfg.logit_scale, cfg.batch)
    valid = (labels >= 0) & (labels < heads.shape[0])
    prob = np.where(valid, probs[np.arange(len(labels)), np.clip(labels, 0, heads.shape[0] - 1)], 0.0).astype(np.float32)
    agree = preds == labels
    low = prob < cfg.min_prob
    disagree = cfg.require_agreement & ~agree
    kept = valid & ~low & ~disagree
    reason = np.where(~valid, "label_unknown", np.where(disagree, "label_disagrees", np.where(low, "below_min_prob", "kept")))
    return pa.table(
        {
            "uid": pa.array(uids.tolist(), pa.string()),
            "label": pa.array(labels.astype(np.int32)),
            "score": pa.array(prob),
            "kept": pa.array(kept),
            "reason": pa.array(reason.tolist(), pa.string()),
            "pred": pa.array(preds.astype(np.int32)),
            "prob": pa.array(prob),
        }
    )


def transductive_choose(
    q_feats: np.ndarray,
    q_groups: np.ndarray | None,
    p_feats: np.ndarray,
    p_labels: np.ndarray,
    k: int,
    knn_cfg: KnnConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """For every query its ``k`` nearest pool rows (within its group when ``q_groups`` is given:
    only pool rows whose label equals the query's group). Returns per pool row ``(best
    similarity, number of queries that chose it)``; best is ``-inf`` for unchosen rows."""
    best = np.full(len(p_feats), -np.inf, np.float32)
    count = np.zeros(len(p_feats), np.int64)

    def take(scores, idx, pool_index):
        ok = idx >= 0
        rows = pool_index[idx[ok]]
        np.maximum.at(best, rows, scores[ok])
        np.add.at(count, rows, 1)

    if q_groups is None:
        scores, idx = search(q_feats, p_feats, k, knn_cfg)
        take(scores, idx, np.arange(len(p_feats)))
        return best, count
    for g in np.unique(q_groups):
        members = np.flatnonzero(p_labels == g)
        if len(members) == 0:
            continue
        qs = q_feats[q_groups == g]
        scores, idx = search(qs, p_feats[members], k, knn_cfg)
        take(scores, idx, members)
    return best, count


def transductive_decision(uids, labels, best, count) -> pa.Table:
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
    """Kept/dropped counts, per class kept counts and the classes left empty."""
    labels = table.column("label").to_numpy()
    kept = table.column("kept").to_numpy(zero_copy_only=False)
    reasons = Counter(table.column("reason").to_pylist())
    per = np.bincount(labels[kept & (labels >= 0)], minlength=num_classes)[:num_classes] if num_classes else np.zeros(0, int)
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
    """(original pool URL, uids, labels, feats) of an embedding or decision directory."""
    if E.is_decision(url):
        root = E.read_meta(url)["pool"]
        uids, labels, feats = E.load(url)
        return root, uids, labels, feats
    uids, labels, feats = E.load(url)
    return url, uids, labels, feats


def _num_classes(text_url: str | None, labels: np.ndarray) -> tuple[int, list[str] | None]:
    if text_url:
        meta = E.read_meta(text_url)
        return int(meta["num_classes"]), list(meta.get("classnames") or []) or None
    return int(labels.max()) + 1 if len(labels) else 0, None


def run_clip_filter(cfg: SelectConfig, pool: str, text: str, out: str, overwrite: bool = False) -> dict:
    """Write the CLIP-score decision over ``pool`` to ``out``; returns its stats."""
    if not io.prepare_output(out, overwrite):
        return io.read_json(io.join(out, "stats.json"))
    t0 = time.perf_counter()
    root, uids, labels, feats = _pool(pool)
    te = E.load_text(text)
    table = clip_score_decision(uids, labels, feats, te.heads("template"), cfg)
    stats = decision_stats(table, te.num_classes, list(te.classnames))
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    meta = {"filter": "clip", "pool": root, "input": pool, "text": text, "config": {k: v for k, v in to_dict(cfg).items() if k in ("min_prob", "require_agreement", "logit_scale")}}
    E.write_decision(out, table, meta, stats)
    log.info("clip filter: kept %d of %d (%s)", stats["kept"], stats["pool"], stats["reasons"])
    return stats


def run_transductive(cfg: SelectConfig, pool: str, queries: str, out: str, text: str | None = None, overwrite: bool = False) -> dict:
    """Write the transductive decision (union of each query's k nearest) to ``out``."""
    if not io.prepare_output(out, overwrite):
        return io.read_json(io.join(out, "stats.json"))
    t0 = time.perf_counter()
    root, uids, labels, feats = _pool(pool)
    _, q_labels, q_feats = E.load(queries)
    groups = None
    if cfg.mode == "kshot":
        groups = q_labels
    elif cfg.mode == "per_class":
        if not text:
            raise io.InputError("transductive --per-class needs --text (class prompt embeddings) to predict query classes")
        groups, _ = zero_shot(q_feats, E.load_text(text).heads("template"), cfg.logit_scale)
    best, count = transductive_choose(np.asarray(q_feats, np.float32), groups, np.asarray(feats, np.float32), labels, cfg.k, cfg.knn())
    table = transductive_decision(uids, labels, best, count)
    n_classes, names = _num_classes(text, np.concatenate([labels, q_labels]) if len(labels) else q_labels)
    stats = decision_stats(table, n_classes, names)
    stats.update({"queries": int(len(q_feats)), "k": cfg.k, "mode": cfg.mode, "seconds": round(time.perf_counter() - t0, 3)})
    meta = {"filter": "transductive", "pool": root, "input": pool, "queries": queries, "config": {"k": cfg.k, "mode": cfg.mode}}
    E.write_decision(out, table, meta, stats)
    log.info("transductive: %d queries x k=%d kept %d of %d pool images", len(q_feats), cfg.k, stats["kept"], stats["pool"])
    return stats


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("clip-filter", parents=[common], help="stage 4: CLIP-score filter (decision only)", description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", required=True, help="pool embeddings (or a decision to start from)")
    p.add_argument("--text", required=True, help="class prompt embeddings (primer embed-text)")
    p.add_argument("--out", required=True, help="decision directory URL")
    p.add_argument("--min-prob", dest="min_prob", type=float, help="minimum softmax probability of the caption label")
    p.add_argument("--require-agreement", dest="require_agreement", action="store_true", default=None, help="keep only images whose zero-shot prediction is their caption label")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_clip)

    p = sub.add_parser("transductive", parents=[common], help="stage 4: transductive kNN filter (decision only)")
    p.add_argument("--pool", required=True, help="pool embeddings, or a decision (e.g. the CLIP filter's) to start from")
    p.add_argument("--queries", required=True, help="target-task embeddings (usually the test split)")
    p.add_argument("--k", type=int, help="neighbours per query (default 10)")
    p.add_argument("--text", help="class prompt embeddings (needed by --per-class; names classes in stats)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--kshot", action="store_true", help="restrict each query to pool images of its ground-truth label")
    g.add_argument("--per-class", dest="per_class", action="store_true", help="restrict each query to pool images of its zero-shot predicted class")
    p.add_argument("--out", required=True, help="decision directory URL")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_transductive)


def _cmd_clip(args: argparse.Namespace) -> int:
    cfg = stage_config(SelectConfig, "select", args.config, args.overrides, {"min_prob": args.min_prob, "require_agreement": args.require_agreement})
    s = run_clip_filter(cfg, args.pool, args.text, args.out, args.overwrite)
    sys.stdout.write(f"kept {s['kept']} of {s['pool']} -> {args.out}\n")
    return 0


def _cmd_transductive(args: argparse.Namespace) -> int:
    mode = "kshot" if args.kshot else "per_class" if args.per_class else None
    cfg = stage_config(SelectConfig, "select", args.config, args.overrides, {"k": args.k, "mode": mode})
    s = run_transductive(cfg, args.pool, args.queries, args.out, args.text, args.overwrite)
    sys.stdout.write(f"kept {s['kept']} of {s['pool']} -> {args.out}\n")
    return 0
