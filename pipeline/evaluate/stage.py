"""Stage 6: accuracy of zero-shot CLIP, CuPL, priming and few-shot heads on cached embeddings.

Rows of the table (mean ± std over seeds where shots are drawn):

- ``zero-shot CLIP``: the template text head;
- ``CuPL``: templates averaged with the descriptions (when the text embeddings have any);
- ``priming`` (``transductive priming`` when the priming set is a transductive decision): the
  ensemble with the priming images' centroids, no shots; ``priming + CuPL``: the same over
  the CuPL text head;
- ``few-shot``: the ensemble of the text head with the shots' centroids;
  ``few-shot + priming``: with the shots and the priming images.

Shots come from the train split, seeded by (seed, shots), never from test; an image present
in both splits stops the run (the reference's SUN397 evaluated on images it also trained
on). ``--alpha auto`` never looks at test labels (rules in :mod:`pipeline.evaluate.classify`).
``--head tip-adapter`` replaces the centroid ensemble by Tip-Adapter's cache model with the
same keys, its (a, b) searched the same way.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from pipeline.core import embeddings as E
from pipeline.core import fingerprint, io
from pipeline.core.config import load_dataset, to_dict
from pipeline.evaluate import classify as C

log = logging.getLogger(__name__)

# The results' layout (results.json, results.md); an output of another is never reused.
OUTPUT_FORMAT = 1

# Footnote marks of the alpha column in results.md, one per rule of pipeline.classify.
RULE_NOTES = {
    "loo-priming": (
        "¹",
        "chosen by leave-one-out over the priming images, scored against their caption labels "
        "(no shots, no test labels; caption labels are noisy)",
    ),
    "cv-shots": (
        "²",
        "chosen by k-fold cross-validation over the shots (fold j holds out the j-th shot of "
        "every class)",
    ),
    "fallback": (
        "³",
        "nothing to validate on (1 shot per class, no priming images): the configured fallback",
    ),
}


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of the evaluation (section ``evaluate`` of the config).

    Attributes:
        shots: shot counts per class; 0 means the rows without shots.
        seeds: shot draws per shot count (seed 0..seeds-1).
        alpha: a number in [0, 1] (weight of the text head) or ``auto``.
        head: ``centroid`` (the priming ensemble) or ``tip-adapter``.
        fallback_alpha: alpha when ``auto`` has nothing to validate on (1 shot, no priming).
        max_loo: zero-shot ``auto``: at most this many priming images are held out.
        tip_max_held: Tip-Adapter without shots: priming images held out to search (a, b).
    """

    shots: tuple[int, ...] = (0, 1, 2, 5, 10)
    seeds: int = 3
    alpha: str = "auto"
    head: str = "centroid"
    fallback_alpha: float = 0.6
    max_loo: int = 20000
    tip_max_held: int = 2000

    def __post_init__(self) -> None:
        problems = []
        if not self.shots or any(s < 0 for s in self.shots):
            problems.append("shots must be a non-empty list of counts >= 0")
        if self.seeds < 1:
            problems.append("seeds must be >= 1")
        if self.alpha != "auto":
            try:
                a = float(self.alpha)
            except ValueError:
                a = math.nan
            if not 0.0 <= a <= 1.0:
                problems.append(f"alpha must be 'auto' or a number in [0, 1], not {self.alpha!r}")
        if self.head not in ("centroid", "tip-adapter"):
            problems.append(f"head must be centroid or tip-adapter, not {self.head!r}")
        if not 0.0 <= self.fallback_alpha <= 1.0:
            problems.append("fallback_alpha must be in [0, 1]")
        if self.max_loo < 1 or self.tip_max_held < 1:
            problems.append("max_loo and tip_max_held must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class Task:
    """Cached embeddings of one evaluation: float32 unit features, int64 labels in [0, C).

    ``cupl`` is the CuPL text head or None; the priming arrays may be empty.
    """

    train_feats: np.ndarray
    train_labels: np.ndarray
    test_feats: np.ndarray
    test_labels: np.ndarray
    text: np.ndarray
    cupl: np.ndarray | None
    priming_feats: np.ndarray
    priming_labels: np.ndarray
    num_classes: int


def cupl_head(te: E.TextEmbeddings) -> np.ndarray | None:
    """CuPL's head ``norm((T_templates + T_descriptions) / 2)``; None without descriptions.

    Classes without descriptions keep their template row (the reference crashed on them).
    """
    if not te.has("description"):
        return None
    t, d = te.heads("template"), te.heads("description")
    has = np.linalg.norm(d, axis=1, keepdims=True) > 0
    mix = np.where(has, (t + d) / 2.0, t)
    return (mix / np.maximum(np.linalg.norm(mix, axis=1, keepdims=True), 1e-12)).astype(np.float32)


# ------------------------------------------------------------------------- the core


class _Records(list):
    def add(self, method, shots, seed, head, acc, n_priming, n_shots, n_test, choice=None):
        alpha = rule = tip = None
        if choice is not None:
            rule = choice.rule
            if isinstance(choice.value, tuple):
                tip = choice.value
            else:
                alpha = round(float(choice.value), 4)
        self.append(
            {
                "method": method,
                "shots": int(shots),
                "seed": int(seed),
                "head": head,
                "accuracy": round(float(acc), 6),
                "alpha": alpha,
                "alpha_rule": rule,
                "tip_a": None if tip is None else tip[0],
                "tip_b": None if tip is None else tip[1],
                "n_priming": int(n_priming),
                "n_shots": int(n_shots),
                "n_test": int(n_test),
            }
        )


def _fixed(value: float) -> C.Choice:
    return C.Choice(float(value), "fixed", float("nan"), 0)


def _shot_draws(task: Task, cfg: EvaluateConfig) -> list[tuple[int, int, np.ndarray]]:
    """(shots, seed, train indices) for every drawn shot set, in table order."""
    return [
        (k, seed, C.sample_shots(task.train_labels, k, seed, task.num_classes))
        for k in sorted({s for s in cfg.shots if s > 0})
        for seed in range(cfg.seeds)
    ]


def _progress(items, desc):
    from pipeline.core.progress import progress

    return progress(items, desc=desc, unit="draw")


def evaluate_task(task: Task, cfg: EvaluateConfig, priming_name: str = "priming") -> list[dict]:
    """Every method x shots x seed on one task; pure numpy, no I/O.

    Returns records ``{method, shots, seed, head, accuracy (0..1), alpha, alpha_rule, tip_a,
    tip_b, n_priming, n_shots, n_test}``; rows without shots have ``shots = seed = 0``.
    """
    records = _Records()
    tx, ty = task.test_feats, task.test_labels
    n_test, n_p = len(ty), len(task.priming_labels)
    rec = records.add
    rec("zero-shot CLIP", 0, 0, "text", C.accuracy(tx, ty, task.text), 0, 0, n_test, _fixed(1))
    texts = [(priming_name, task.text)]
    if task.cupl is not None:
        rec("CuPL", 0, 0, "text", C.accuracy(tx, ty, task.cupl), 0, 0, n_test, _fixed(1))
        texts.append((f"{priming_name} + CuPL", task.cupl))
    if cfg.head == "tip-adapter":
        _tip_rows(task, cfg, priming_name, texts, rec)
        return list(records)

    fixed = None if cfg.alpha == "auto" else _fixed(float(cfg.alpha))
    c = task.num_classes
    p_f, p_y = task.priming_feats, task.priming_labels
    p_sums = C.class_sums(p_f, p_y, c) if n_p else None  # once: every priming row reuses it
    if n_p:
        for name, text in texts:
            ch = fixed or C.choose_alpha(
                text, p_f[:0], p_y[:0], p_f, p_y, max_held=cfg.max_loo, priming_sums=p_sums
            )
            acc = C.accuracy(tx, ty, C.weights_from_sums(text, p_sums, ch.value))
            rec(name, 0, 0, "centroid", acc, n_p, 0, n_test, ch)
    t = task.text
    for k, seed, idx in _progress(_shot_draws(task, cfg), "few-shot draws"):
        sf, sy = task.train_feats[idx], task.train_labels[idx]
        s_sums = C.class_sums(sf, sy, c)
        ch = fixed or C.choose_alpha(t, sf, sy, p_f[:0], p_y[:0], fallback=cfg.fallback_alpha)
        acc = C.accuracy(tx, ty, C.weights_from_sums(t, s_sums, ch.value))
        rec("few-shot", k, seed, "centroid", acc, 0, len(idx), n_test, ch)
        if n_p:
            ch = fixed or C.choose_alpha(t, sf, sy, p_f, p_y, priming_sums=p_sums)
            acc = C.accuracy(tx, ty, C.weights_from_sums(t, s_sums + p_sums, ch.value))
            rec(f"few-shot + {priming_name}", k, seed, "centroid", acc, n_p, len(idx), n_test, ch)
    return list(records)


def _tip_rows(task: Task, cfg: EvaluateConfig, priming_name: str, texts, rec) -> None:
    """Tip-Adapter rows: cache keys are the priming images and/or the shots; (a, b) searched
    on held-out priming images (no shots) or held-out folds of shots, never on test."""
    c, b_grid = task.num_classes, C.TIP_B_GRID
    tx, ty = task.test_feats, task.test_labels
    p_f, p_y = task.priming_feats, task.priming_labels
    n_test, n_p = len(ty), len(p_y)

    def test_acc(text, choice, cache_aff):
        a, b = choice.value
        logits = 100.0 * tx @ text.T + a * cache_aff[b_grid.index(b)]
        return float(np.mean(np.argmax(logits, axis=1) == ty))

    draws = _shot_draws(task, cfg)
    if n_p:
        p_counts = np.bincount(p_y, minlength=c)
        test_p = C.class_affinity(tx, p_f, p_y, c, b_grid)  # reused by every row with priming
        held = np.arange(n_p)
        if n_p > cfg.tip_max_held:
            held = np.sort(np.random.default_rng(0).choice(n_p, cfg.tip_max_held, replace=False))
        held_aff = C.class_affinity(p_f[held], p_f, p_y, c, b_grid)
        rem, rem_counts = C.held_out_affinity(p_f[held], p_y[held], np.arange(len(held)), c)
        for name, text in texts:
            ch = C.search_tip(
                text, p_f[held], p_y[held], held_aff, rem, p_counts, rem_counts, rule="loo-priming"
            )
            rec(name, 0, 0, "tip-adapter", test_acc(text, ch, test_p), n_p, 0, n_test, ch)
        # Every shot's affinity to the priming cache, computed once for all draws.
        union = np.unique(np.concatenate([d[2] for d in draws])) if draws else np.zeros(0, int)
        union_p = C.class_affinity(task.train_feats[union], p_f, p_y, c, b_grid)
    t = task.text
    for k, seed, idx in _progress(draws, "few-shot draws (tip-adapter)"):
        sf, sy = task.train_feats[idx], task.train_labels[idx]
        s_counts = np.bincount(sy, minlength=c)
        test_s = C.class_affinity(tx, sf, sy, c, b_grid)
        val_s = C.class_affinity(sf, sf, sy, c, b_grid)
        rem, rem_counts = C.held_out_affinity(sf, sy, C.shot_folds(sy), c, b_grid)
        ch = C.search_tip(t, sf, sy, val_s, rem, s_counts, rem_counts)
        if ch.rule == "fallback":
            log.info(
                "tip-adapter %d-shot seed %d: nothing to validate on, (a, b) = %s",
                k,
                seed,
                ch.value,
            )
        rec("few-shot", k, seed, "tip-adapter", test_acc(t, ch, test_s), 0, len(idx), n_test, ch)
        if n_p:
            val = val_s + union_p[:, np.searchsorted(union, idx)]
            ch = C.search_tip(t, sf, sy, val, rem, s_counts + p_counts, rem_counts)
            acc = test_acc(t, ch, test_s + test_p)
            rec(
                f"few-shot + {priming_name}", k, seed, "tip-adapter", acc, n_p, len(idx), n_test, ch
            )


def render_table(
    records: list[dict],
    title: str = "",
    notes: list[str] | None = None,
    warnings: list[str] | None = None,
) -> str:
    """Markdown: one row per (method, shots) with accuracy mean ± std over seeds (population
    std, in percent), the mean alpha (or Tip-Adapter's a, b) with a footnote mark for how it
    was chosen, and the number of seeds; then the footnotes and ``notes``. ``warnings`` go
    in bold above the table."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["shots"]), []).append(r)
    lines = [
        f"# {title}" if title else "# Results",
        "",
        *[f"**{w}**\n" for w in warnings or []],
        "| method | shots | accuracy (%) | alpha | seeds |",
        "|---|---:|---:|---:|---:|",
    ]
    used_rules: list[str] = []
    for (method, shots), rs in groups.items():
        accs = np.array([r["accuracy"] for r in rs]) * 100
        acc = f"{accs.mean():.2f} ± {accs.std():.2f}" if len(rs) > 1 else f"{accs.mean():.2f}"
        alphas = [r["alpha"] for r in rs if r.get("alpha") is not None]
        tips = [(r["tip_a"], r["tip_b"]) for r in rs if r.get("tip_a") is not None]
        if alphas:
            setting = f"{np.mean(alphas):.2f}"
        elif tips:
            a, b = np.mean(tips, axis=0)
            setting = f"a={a:.2f} b={b:.1f}"
        else:
            setting = "-"
        marks = ""
        for rule in dict.fromkeys(r.get("alpha_rule") for r in rs):
            if rule in RULE_NOTES:
                marks += RULE_NOTES[rule][0]
                if rule not in used_rules:
                    used_rules.append(rule)
        lines.append(f"| {method} | {shots} | {acc} | {setting}{marks} | {len(rs)} |")
    foot = [
        f"{RULE_NOTES[r][0]} {RULE_NOTES[r][1]}."
        for r in sorted(used_rules, key=list(RULE_NOTES).index)
    ]
    extra = foot + list(notes or [])
    if extra:
        lines.append("")
        lines += [f"{n}  " for n in extra[:-1]] + [extra[-1]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- I/O shell


def _check_dim(url: str, feats: np.ndarray, dim: int) -> None:
    if len(feats) and feats.shape[1] != dim:
        raise io.InputError(f"{url}: embeddings have dim {feats.shape[1]}, the text head {dim}")


def load_task(
    dataset: str, train: str, test: str, text: str, priming: str | None
) -> tuple[Task, dict]:
    """Load and check the embeddings of one evaluation.

    Returns ``(task, info)``; ``info`` has ``priming_name`` (``transductive priming`` for a
    transductive decision), ``untrained``, ``priming_dropped`` (rows whose caption label is
    outside the task's classes) and ``dataset`` (the spec's name).

    Raises:
        pipeline.core.io.InputError: an incomplete input, train and test sharing an image (leakage),
            a class count or dimension that does not match, an empty test split, or a class
            without a template prompt embedding.
    """
    spec = load_dataset(dataset)
    c = spec.num_classes
    E.check_same_model({"train": train, "test": test, "text": text, "priming": priming})
    te = E.load_text(text)
    if te.num_classes != c:
        raise io.InputError(f"{text} has {te.num_classes} classes but {spec.name} has {c}")
    t = te.heads("template")
    missing = np.flatnonzero(np.linalg.norm(t, axis=1) == 0)
    if len(missing):
        raise io.InputError(
            f"{text}: {len(missing)} classes have no template prompt embedding "
            f"(e.g. class {missing[0]} {spec.classes[missing[0]]!r}); rerun embed-text"
        )
    tr_u, tr_y, tr_f = E.load(train)
    te_u, te_y, te_f = E.load(test)
    leaked = np.intersect1d(tr_u.astype(str), te_u.astype(str))
    if len(leaked):
        raise io.InputError(
            f"leakage: {len(leaked)} images appear in both {train} and {test} (e.g. uid "
            f"{leaked[0]}); shots would be drawn from test images. Train and test must be disjoint"
        )
    if len(te_y) == 0:
        raise io.InputError(f"{test} holds no test embeddings")
    for url, y in ((train, tr_y), (test, te_y)):
        if len(y) and (y.min() < 0 or y.max() >= c):
            raise io.InputError(f"{url}: labels outside [0, {c}) for {spec.name}")
    for url, f in ((train, tr_f), (test, te_f)):
        _check_dim(url, f, t.shape[1])
    info = {"priming_name": "priming", "priming_dropped": 0, "dataset": spec.name}
    p_f, p_y = np.zeros((0, t.shape[1]), np.float32), np.zeros(0, np.int64)
    if priming:
        _, p_y, p_f = E.load(priming)
        _check_dim(priming, p_f, t.shape[1])
        ok = (p_y >= 0) & (p_y < c)
        if not ok.all():
            info["priming_dropped"] = int((~ok).sum())
            log.warning(
                "%s: dropped %d priming rows whose label is outside [0, %d)",
                priming,
                (~ok).sum(),
                c,
            )
        p_f, p_y = p_f[ok], p_y[ok]
        if len(p_y) == 0:
            log.warning("%s holds no priming images: the priming rows are left out", priming)
        if E.is_decision(priming) and E.read_meta(priming).get("filter") == "transductive":
            info["priming_name"] = "transductive priming"
    info["untrained"] = any(
        bool(E.read_meta(u).get("untrained"))
        for u in (train, test, text)
        if io.exists(io.join(u, E.META))
    )
    task = Task(
        tr_f.astype(np.float32),
        tr_y,
        te_f.astype(np.float32),
        te_y,
        t,
        cupl_head(te),
        p_f.astype(np.float32),
        p_y,
        c,
    )
    return task, info


def run_evaluate(
    cfg: EvaluateConfig,
    dataset: str,
    train: str,
    test: str,
    text: str,
    out: str,
    priming: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Run stage 6: results.json, results.md, config.json, then ``_SUCCESS`` under ``out``.

    Returns the results dict (also when a complete output is skipped). Raises
    :class:`pipeline.core.io.InputError` for bad inputs (see :func:`load_task`).
    """
    inputs = {
        "train": train,
        "test": test,
        "text": text,
        **({"priming": priming} if priming else {}),
    }
    fp = fingerprint.make(
        "evaluate",
        OUTPUT_FORMAT,
        fingerprint.result_settings(cfg),
        {k: fingerprint.input_identity(v) for k, v in inputs.items()},
        dataset=load_dataset(dataset, descriptions=False).identity("classes"),
    )
    if not fingerprint.prepare(out, fp, overwrite):
        return io.read_json(io.join(out, "results.json"))
    t0 = time.perf_counter()
    task, info = load_task(dataset, train, test, text, priming)
    t_load = time.perf_counter() - t0
    records = evaluate_task(task, cfg, info["priming_name"])
    alpha_note = (
        f"alpha fixed at {float(cfg.alpha):g} (weight of the text head)."
        if cfg.alpha != "auto"
        else "alpha auto: chosen without test labels (rules in pipeline/evaluate/classify.py)."
    )
    if cfg.head == "tip-adapter":
        alpha_note = (
            "Tip-Adapter head: a, b searched on held-out shots or priming images, never test."
        )
    notes = [
        alpha_note,
        f"{len(task.test_labels)} test, {len(task.train_labels)} train, "
        f"{len(task.priming_labels)} priming images; std over seeds is the population std.",
    ]
    warnings = []
    if info["untrained"]:
        warnings.append(
            "Untrained model weights (pretrained=none): these accuracies are meaningless."
        )
    table = render_table(records, f"{info['dataset']}: accuracy", notes, warnings)
    result = {
        "dataset": dataset,
        "num_classes": task.num_classes,
        "n_train": len(task.train_labels),
        "n_test": len(task.test_labels),
        "n_priming": len(task.priming_labels),
        "priming_dropped": info["priming_dropped"],
        "priming_method": info["priming_name"],
        "untrained": info["untrained"],
        "records": records,
        "seconds": {"load": round(t_load, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    io.write_json(io.join(out, "results.json"), result)
    io.write_bytes(io.join(out, "results.md"), table.encode("utf-8"))
    config = {"dataset": dataset, "train": train, "test": test, "text": text, "priming": priming}
    io.write_json(io.join(out, "config.json"), {**config, **to_dict(cfg)})
    io.mark_done(out)
    log.info(
        "evaluation of %s written to %s in %.1f s", info["dataset"], out, time.perf_counter() - t0
    )
    return result
