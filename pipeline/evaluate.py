"""Stage 6: accuracy of zero-shot CLIP, CuPL, priming and few-shot heads on cached embeddings.

Rows of the table (mean +- std over seeds where shots are drawn):

- ``zero-shot CLIP``: the template text head;
- ``CuPL``: templates averaged with the descriptions (when the dataset has a file);
- ``priming`` (``transductive priming`` when the priming set is a transductive decision): the
  ensemble with the priming images' centroids, no shots;
- ``priming + CuPL``;
- ``few-shot``: the ensemble with the shots only; ``few-shot + priming``: shots and priming images.

Shots come from the train split, seeded by (seed, shots), never from test; an image present
in both splits stops the run (the reference's SUN397 leaked test images into training).
``--alpha auto`` never looks at test labels (:func:`pipeline.classify.choose_alpha`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass

import numpy as np

from pipeline import classify as C
from pipeline import embeddings as E
from pipeline import io
from pipeline.config import load_dataset, stage_config, to_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of the evaluation (section ``evaluate``). ``alpha``: a number in [0, 1] or ``auto``."""

    shots: tuple[int, ...] = (0, 1, 2, 5, 10)
    seeds: int = 3
    alpha: str = "auto"
    head: str = "centroid"

    def __post_init__(self) -> None:
        problems = []
        if any(s < 0 for s in self.shots):
            problems.append("shots must be >= 0")
        if self.seeds < 1:
            problems.append("seeds must be >= 1")
        if self.alpha != "auto":
            try:
                a = float(self.alpha)
                if not 0.0 <= a <= 1.0:
                    raise ValueError
            except ValueError:
                problems.append(f"alpha must be 'auto' or a number in [0, 1], not {self.alpha!r}")
        if self.head not in ("centroid", "tip-adapter"):
            problems.append("head must be centroid or tip-adapter")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class Task:
    train_feats: np.ndarray
    train_labels: np.ndarray
    test_feats: np.ndarray
    test_labels: np.ndarray
    text: np.ndarray
    cupl: np.ndarray | None
    priming_feats: np.ndarray
    priming_labels: np.ndarray
    num_classes: int


def _cupl_head(te: E.TextEmbeddings) -> np.ndarray | None:
    if not te.has("description"):
        return None
    t, d = te.heads("template"), te.heads("description")
    has = np.linalg.norm(d, axis=1, keepdims=True) > 0
    mix = np.where(has, (t + d) / 2.0, t)
    return (mix / np.maximum(np.linalg.norm(mix, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def evaluate_task(task: Task, cfg: EvaluateConfig, priming_name: str = "priming") -> list[dict]:
    """Every method x shots x seed: ``[{method, shots, seed, accuracy, alpha, n_priming, n_shots}]``."""
    records = []
    tx, ty = task.test_feats, task.test_labels
    has_priming = len(task.priming_labels) > 0
    fixed = None if cfg.alpha == "auto" else float(cfg.alpha)

    def rec(method, shots, seed, acc, alpha, n_shots):
        records.append({"method": method, "shots": shots, "seed": seed, "accuracy": round(acc, 6), "alpha": None if alpha is None else round(float(alpha), 4), "n_priming": int(len(task.priming_labels)) if "priming" in method else 0, "n_shots": int(n_shots)})

    def head_acc(text, feats, labels, alpha, val=None):
        if cfg.head == "tip-adapter":
            vf, vl = val if val is not None else (feats, labels)
            a, b = C.search_tip(text, feats, labels, vf, vl)
            return float(np.mean(np.argmax(C.tip_logits(tx, text, feats, labels, a, b), 1) == ty)), None
        return C.accuracy(tx, ty, C.priming_weights(text, feats, labels, alpha)), alpha

    rec("zero-shot CLIP", 0, 0, C.accuracy(tx, ty, task.text), 1.0, 0)
    if task.cupl is not None:
        rec("CuPL", 0, 0, C.accuracy(tx, ty, task.cupl), 1.0, 0)
    empty_f = np.zeros((0, tx.shape[1]), np.float32)
    empty_y = np.zeros(0, np.int64)
    if has_priming:
        for name, text in ((priming_name, task.text), (f"{priming_name} + CuPL", task.cupl)):
            if text is None:
                continue
            alpha = fixed if fixed is not None else C.choose_alpha(text, empty_f, empty_y, task.priming_feats, task.priming_labels)
            val = None
            if cfg.head == "tip-adapter":
                # Tip-Adapter's a, b: tuned on a seeded held-out fifth of the priming set.
                rng = np.random.default_rng(0)
                perm = rng.permutation(len(task.priming_labels))
                cut = max(1, len(perm) // 5)
                val = (task.priming_feats[perm[:cut]], task.priming_labels[perm[:cut]])
            acc, used = head_acc(text, task.priming_feats, task.priming_labels, alpha, val)
            rec(name, 0, 0, acc, used, 0)
    for shots in sorted(s for s in cfg.shots if s > 0):
        for seed in range(cfg.seeds):
            idx = C.sample_shots(task.train_labels, shots, seed, task.num_classes)
            sf, sy = task.train_feats[idx], task.train_labels[idx]
            alpha = fixed if fixed is not None else C.choose_alpha(task.text, sf, sy, empty_f, empty_y)
            acc, used = head_acc(task.text, sf, sy, alpha)
            rec("few-shot", shots, seed, acc, used, len(idx))
            if has_priming:
                pf = np.concatenate([np.asarray(sf, np.float32), np.asarray(task.priming_feats, np.float32)])
                py = np.concatenate([sy, task.priming_labels])
                alpha = fixed if fixed is not None else C.choose_alpha(task.text, sf, sy, task.priming_feats, task.priming_labels)
                acc, used = head_acc(task.text, pf, py, alpha, (sf, sy))
                rec(f"few-shot + {priming_name}", shots, seed, acc, used, len(idx))
    return records


def render_table(records: list[dict], title: str = "", notes: list[str] | None = None) -> str:
    """Markdown table: method, shots, accuracy mean +- std over seeds, mean alpha, seeds."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["shots"]), []).append(r)
    lines = [f"# {title}" if title else "# Results", "", "| method | shots | accuracy (%) | alpha | seeds |", "|---|---:|---:|---:|---:|"]
    for (method, shots), rs in groups.items():
        accs = np.array([r["accuracy"] for r in rs]) * 100
        alphas = [r["alpha"] for r in rs if r["alpha"] is not None]
        acc = f"{accs.mean():.2f} ± {accs.std():.2f}" if len(rs) > 1 else f"{accs.mean():.2f}"
        alpha = f"{np.mean(alphas):.2f}" if alphas else "-"
        lines.append(f"| {method} | {shots} | {acc} | {alpha} | {len(rs)} |")
    if notes:
        lines += [""] + [f"{n}" for n in notes]
    return "\n".join(lines) + "\n"


def load_task(dataset: str, train: str, test: str, text: str, priming: str | None) -> tuple[Task, str, bool]:
    """Load embeddings; returns (task, priming row name, untrained weights?)."""
    spec = load_dataset(dataset)
    tr_u, tr_y, tr_f = E.load(train)
    te_u, te_y, te_f = E.load(test)
    leaked = np.intersect1d(tr_u, te_u)
    if len(leaked):
        raise io.InputError(f"{len(leaked)} images appear in both {train} and {test} (e.g. uid {leaked[0]}): train and test must be disjoint")
    te = E.load_text(text)
    if te.num_classes != spec.num_classes:
        raise io.InputError(f"{text} has {te.num_classes} classes but {spec.name} has {spec.num_classes}")
    name = "priming"
    p_f, p_y = np.zeros((0, te_f.shape[1]), np.float16), np.zeros(0, np.int64)
    if priming:
        _, p_y, p_f = E.load(priming)
        ok = (p_y >= 0) & (p_y < spec.num_classes)
        p_f, p_y = p_f[ok], p_y[ok]
        if E.is_decision(priming) and E.read_meta(priming).get("filter") == "transductive":
            name = "transductive priming"
    untrained = bool(E.read_meta(test).get("untrained")) if io.exists(io.join(test, E.META)) else False
    task = Task(tr_f.astype(np.float32), tr_y, te_f.astype(np.float32), te_y, te.heads("template"), _cupl_head(te), p_f.astype(np.float32), p_y, spec.num_classes)
    return task, name, untrained


def run_evaluate(cfg: EvaluateConfig, dataset: str, train: str, test: str, text: str, out: str, priming: str | None = None, overwrite: bool = False) -> dict:
    """Run stage 6; writes results.json, results.md, config.json and _SUCCESS."""
    if not io.prepare_output(out, overwrite):
        return io.read_json(io.join(out, "results.json"))
    t0 = time.perf_counter()
    task, name, untrained = load_task(dataset, train, test, text, priming)
    records = evaluate_task(task, cfg, name)
    notes = [
        "alpha 'auto': chosen without test labels — leave-one-out over the shots when there are shots, "
        "otherwise leave-one-out over the priming images against their caption labels (ties go to the larger alpha)."
        if cfg.alpha == "auto"
        else f"alpha fixed at {cfg.alpha}.",
        f"{len(task.test_labels)} test images, {len(task.train_labels)} train images, {len(task.priming_labels)} priming images, head {cfg.head}.",
    ]
    if untrained:
        notes.insert(0, "**Untrained model weights (pretrained=none): these accuracies are meaningless.**")
    table = render_table(records, f"{load_dataset(dataset).name}: accuracy", notes)
    result = {"dataset": dataset, "records": records, "seconds": round(time.perf_counter() - t0, 3), "untrained": untrained}
    io.write_json(io.join(out, "results.json"), result)
    io.write_bytes(io.join(out, "results.md"), table.encode("utf-8"))
    io.write_json(io.join(out, "config.json"), {"dataset": dataset, "train": train, "test": test, "text": text, "priming": priming, **to_dict(cfg)})
    io.mark_done(out)
    return result


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("evaluate", parents=[common], help="stage 6: accuracy table of zero-shot, CuPL, priming and few-shot heads", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--task-train", dest="train", required=True, help="train-split embeddings (shots come from here)")
    p.add_argument("--task-test", dest="test", required=True, help="test-split embeddings")
    p.add_argument("--text", required=True, help="class prompt embeddings")
    p.add_argument("--priming", help="priming embeddings, or a decision (its kept pool rows)")
    p.add_argument("--shots", help="comma list, e.g. 0,1,2,5,10")
    p.add_argument("--seeds", type=int, help="shot draws per shot count")
    p.add_argument("--alpha", help="a number in [0, 1], or auto")
    p.add_argument("--head", choices=["centroid", "tip-adapter"])
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    cfg = stage_config(EvaluateConfig, "evaluate", args.config, args.overrides, {"shots": args.shots, "seeds": args.seeds, "alpha": args.alpha, "head": args.head})
    run_evaluate(cfg, args.dataset, args.train, args.test, args.text, args.out, args.priming, args.overwrite)
    sys.stdout.write(io.read_bytes(io.join(args.out, "results.md")).decode("utf-8"))
    return 0
