"""The evaluation's protocols and the rows each produces (pure numpy; no I/O).

- ``zero-shot``: CLIP's text head (``zero-shot CLIP``) and CuPL's (``CuPL``): no image at all;
- ``zero-shot priming`` (the paper's main table): the text head ensembled with the centroids
  of priming images chosen by text (text filter, CLIP-score filter) only; no test image is
  used anywhere (alpha may use the train split's images without labels, see
  :mod:`pipeline.evaluate.alpha`);
- ``transductive priming`` (the paper's distribution-shift table): the priming pool narrowed
  to the test images' nearest neighbours; test images are used, their labels never;
- ``few-shot``: shots from the train split (seeded), alone and with each priming set; the rows
  say whether the priming set used test images.

Every row is scored by top-1 and by mean per-class accuracy. Priming images that are near
copies of a test image are gone before any row (the stage removes them); for few-shot rows
also the copies of that draw's shots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from pipeline.evaluate import alpha as A
from pipeline.evaluate import reference as R
from pipeline.evaluate import tip as TIP
from pipeline.evaluate.classify import class_sums, sample_shots, shot_folds, weights_from_sums
from pipeline.evaluate.metrics import mean_per_class, top1

log = logging.getLogger(__name__)

ZERO_SHOT = "zero-shot"
ZERO_SHOT_PRIMING = "zero-shot priming"
TRANSDUCTIVE_PRIMING = "transductive priming"
FEW_SHOT = "few-shot"
PRIMING_PROTOCOLS = (ZERO_SHOT_PRIMING, TRANSDUCTIVE_PRIMING)
# The method name of each priming protocol's rows ("priming" keeps the paper's name).
METHOD = {ZERO_SHOT_PRIMING: "priming", TRANSDUCTIVE_PRIMING: "transductive priming"}


@dataclass
class Priming:
    """One priming set, ready for the rows of its protocol.

    ``feats``/``labels``: the priming images (float32 unit rows, labels in ``[0, C)``).
    ``held_*``: a sample of the pool before any filter, for choosing alpha without shots
    (``held_in_head`` marks the rows that are also priming images). ``shot_dups``: (priming
    row, train row) pairs of near-duplicates, removed from the head of a draw holding that
    train image. ``stats``: what the stage counted on the way (written to results.json).
    ``uses_test_images``: the selection looked at test images (default: transductive).
    """

    protocol: str
    feats: np.ndarray
    labels: np.ndarray
    held_feats: np.ndarray
    held_labels: np.ndarray
    held_in_head: np.ndarray
    shot_dups: tuple[np.ndarray, np.ndarray] = field(
        default_factory=lambda: (np.zeros(0, np.int64), np.zeros(0, np.int64))
    )
    stats: dict = field(default_factory=dict)
    uses_test_images: bool | None = None

    def __post_init__(self) -> None:
        if self.uses_test_images is None:  # a transductive selection's queries are test images
            self.uses_test_images = self.protocol == TRANSDUCTIVE_PRIMING


@dataclass
class Task:
    """Cached embeddings of one evaluation: float32 unit features, int64 labels in [0, C).

    ``text`` is the template head, ``cupl`` the CuPL head or None; ``primings`` may be empty.
    """

    train_feats: np.ndarray
    train_labels: np.ndarray
    test_feats: np.ndarray
    test_labels: np.ndarray
    text: np.ndarray
    cupl: np.ndarray | None
    num_classes: int
    primings: list[Priming] = field(default_factory=list)
    dataset: str = ""


def fixed(value: float, rule: str = "fixed") -> A.Choice:
    return A.Choice(float(value), rule, float("nan"), 0)


def shot_draws(task: Task, shots, seeds: int) -> list[tuple[int, int, np.ndarray]]:
    """(shots, seed, train indices) for every drawn shot set, in table order."""
    return [
        (k, seed, sample_shots(task.train_labels, k, seed, task.num_classes))
        for k in sorted({s for s in shots if s > 0})
        for seed in range(seeds)
    ]


def _progress(items, desc):
    from pipeline.core.progress import progress

    return progress(items, desc=desc, unit="draw")


def _predict(feats: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.argmax(feats @ np.asarray(weights, np.float32).T, axis=1)


def _targets(uses_test: bool, choice: A.Choice, shots: bool) -> str:
    """What target-task images a row used (results.json's ``target_images``)."""
    used = ["train shots"] if shots else []
    if uses_test:
        used.append("test, unlabelled (selection)")
    if choice.rule.endswith("knn-train"):
        used.append("train, unlabelled (alpha)")
    elif choice.rule.endswith("knn-test"):
        used.append("test, unlabelled (alpha)")
    return "; ".join(dict.fromkeys(used)) or "none"


class Records(list):
    """The rows of the table as dicts (see :func:`evaluate_task`)."""

    def __init__(self, task: Task):
        super().__init__()
        self.task = task

    def add(
        self,
        protocol: str,
        method: str,
        pred: np.ndarray,
        choice: A.Choice,
        head: str = "centroid",
        priming: Priming | None = None,
        shots: int = 0,
        seed: int = 0,
        n_shots: int = 0,
    ) -> None:
        """One row: ``pred`` the test predictions, ``choice`` how alpha (or Tip-Adapter's
        a, b) was set, ``priming`` the priming set in the head (None: none)."""
        y = self.task.test_labels
        tip = choice.value if isinstance(choice.value, tuple) else None
        uses_test = priming is not None and bool(priming.uses_test_images)
        self.append(
            {
                "protocol": protocol,
                "method": method,
                "shots": int(shots),
                "seed": int(seed),
                "head": head,
                "accuracy": round(top1(pred, y), 6),
                "mean_per_class": round(mean_per_class(pred, y), 6),
                "alpha": None if tip else round(float(choice.value), 4),
                "alpha_rule": choice.rule,
                "tip_a": tip[0] if tip else None,
                "tip_b": tip[1] if tip else None,
                "n_priming": 0 if priming is None else int(len(priming.labels)),
                "n_shots": int(n_shots),
                "n_test": int(len(y)),
                "test_images": "unlabelled" if uses_test else "no",
                "target_images": _targets(uses_test, choice, shots > 0),
            }
        )


def _without_dups(p: Priming, shot_idx: np.ndarray, sums: np.ndarray, c: int) -> np.ndarray:
    """The priming class sums without the images that copy one of these shots."""
    rows, train_rows = p.shot_dups
    drop = np.unique(rows[np.isin(train_rows, shot_idx)])
    if len(drop) == 0:
        return sums
    return sums - class_sums(p.feats[drop], p.labels[drop], c)


def _text_rows(task: Task, rec: Records, rule: str = "fixed") -> list[tuple[str, np.ndarray]]:
    """The zero-shot rows; returns the text heads the priming rows ensemble with."""
    tx = task.test_feats
    rec.add(ZERO_SHOT, "zero-shot CLIP", _predict(tx, task.text), fixed(1, rule), "text")
    texts = [("", task.text)]
    if task.cupl is not None:
        rec.add(ZERO_SHOT, "CuPL", _predict(tx, task.cupl), fixed(1, rule), "text")
        texts.append((" + CuPL", task.cupl))
    return texts


def evaluate_task(task: Task, cfg) -> list[dict]:
    """Every protocol x method x shots x seed on one task (``cfg`` an
    :class:`pipeline.evaluate.stage.EvaluateConfig`).

    Returns records ``{protocol, method, shots, seed, head, accuracy (top-1, 0..1),
    mean_per_class, alpha, alpha_rule, tip_a, tip_b, n_priming, n_shots, n_test,
    test_images ("no" | "unlabelled"), target_images}``; rows without shots have
    ``shots = seed = 0``.
    """
    if cfg.protocol == "reference":
        return reference_rows(task, cfg)
    rec = Records(task)
    texts = _text_rows(task, rec)
    if cfg.head == "tip-adapter":
        _tip_rows(task, cfg, texts, rec)
        return list(rec)
    tx, c, t = task.test_feats, task.num_classes, task.text
    user = None if cfg.alpha == "auto" else fixed(float(cfg.alpha))
    nn_cache: dict = {}
    prepared = []
    for p in task.primings:
        if len(p.labels) == 0:
            log.warning("%s: no priming image left; its rows are left out", p.protocol)
            continue
        sums = class_sums(p.feats, p.labels, c)
        prepared.append((p, sums))
        where = "test" if p.uses_test_images else "train"
        t_feats, t_nn = _alpha_target(task, cfg, where, nn_cache) or (None, None)
        counts = np.bincount(p.labels, minlength=c)
        held = (p.held_feats, p.held_labels, p.held_in_head)
        for suffix, text in texts:
            ch = user or A.choose_alpha_priming(
                text, sums, counts, held, t_feats, where, t_nn, cfg.fallback_alpha
            )
            pred = _predict(tx, weights_from_sums(text, sums, ch.value))
            rec.add(p.protocol, METHOD[p.protocol] + suffix, pred, ch, priming=p)
    for k, seed, idx in _progress(shot_draws(task, cfg.shots, cfg.seeds), "few-shot draws"):
        sf, sy = task.train_feats[idx], task.train_labels[idx]
        s_sums = class_sums(sf, sy, c)
        draw = {"shots": k, "seed": seed, "n_shots": len(idx)}
        ch = user or A.choose_alpha_shots(t, sf, sy, None, cfg.fallback_alpha)
        pred = _predict(tx, weights_from_sums(t, s_sums, ch.value))
        rec.add(FEW_SHOT, "few-shot", pred, ch, **draw)
        for p, sums in prepared:
            p_sums = _without_dups(p, idx, sums, c)
            ch = user or A.choose_alpha_shots(t, sf, sy, p_sums, cfg.fallback_alpha)
            pred = _predict(tx, weights_from_sums(t, s_sums + p_sums, ch.value))
            rec.add(FEW_SHOT, f"few-shot + {METHOD[p.protocol]}", pred, ch, priming=p, **draw)
    return list(rec)


def _alpha_target(task: Task, cfg, where: str, cache: dict):
    """``(feats, neighbours)`` of the unlabelled target images the no-shot alpha rule may use
    (``where`` is ``train`` or ``test``), a seeded sample of at most ``cfg.max_target``;
    None when there are none or ``cfg.alpha_target`` is ``none`` for the train split."""
    if cfg.alpha != "auto" or (where == "train" and cfg.alpha_target == "none"):
        return None
    if where not in cache:
        feats = task.train_feats if where == "train" else task.test_feats
        if len(feats) < 2:
            cache[where] = None
        else:
            if len(feats) > cfg.max_target:
                rng = np.random.default_rng([cfg.seed, 7])
                feats = feats[np.sort(rng.choice(len(feats), cfg.max_target, replace=False))]
            cache[where] = (feats, A.neighbours(feats))
    return cache[where]


# ----------------------------------------------------------------------- Tip-Adapter


def _tip_rows(task: Task, cfg, texts, rec: Records) -> None:
    """Tip-Adapter rows: cache keys are the priming images and/or the shots; (a, b) searched
    on the pool before filtering (no shots) or on held-out folds of shots, never on test."""
    c, b_grid, bal = task.num_classes, TIP.TIP_B_GRID, cfg.tip_balance
    tx, t = task.test_feats, task.text

    def predict(text, choice, cache_aff, counts):
        a, b = choice.value
        aff = cache_aff[b_grid.index(b)]
        return np.argmax(100.0 * tx @ text.T + a * (TIP.balance(aff, counts) if bal else aff), 1)

    draws = shot_draws(task, cfg.shots, cfg.seeds)
    union = np.unique(np.concatenate([d[2] for d in draws])) if draws else np.zeros(0, int)
    cached = []
    for p in task.primings:
        if len(p.labels) == 0:
            continue
        counts = np.bincount(p.labels, minlength=c)
        test_aff = TIP.class_affinity(tx, p.feats, p.labels, c, b_grid)
        held = np.arange(len(p.held_labels))
        if len(held) > cfg.tip_max_held:
            rng = np.random.default_rng([cfg.seed, 11])
            held = np.sort(rng.choice(len(held), cfg.tip_max_held, replace=False))
        hf, hy, hin = p.held_feats[held], p.held_labels[held], p.held_in_head[held]
        val = TIP.class_affinity(hf, p.feats, p.labels, c, b_grid)
        groups = np.where(hin, np.arange(len(held)), -1)  # a held row in the cache removes itself
        rem, rem_counts = TIP.held_out_affinity(hf, hy, groups, c, b_grid)
        for suffix, text in texts:
            ch = TIP.search_tip(text, hf, hy, val, counts, rem, rem_counts, bal, rule="pool")
            pred = predict(text, ch, test_aff, counts)
            rec.add(p.protocol, METHOD[p.protocol] + suffix, pred, ch, "tip-adapter", p)
        # Every shot's affinity to this priming cache, computed once for all draws.
        union_aff = TIP.class_affinity(task.train_feats[union], p.feats, p.labels, c, b_grid)
        cached.append((p, counts, test_aff, union_aff))
    for k, seed, idx in _progress(draws, "few-shot draws (tip-adapter)"):
        sf, sy = task.train_feats[idx], task.train_labels[idx]
        draw = {"shots": k, "seed": seed, "n_shots": len(idx)}
        s_counts = np.bincount(sy, minlength=c)
        test_s = TIP.class_affinity(tx, sf, sy, c, b_grid)
        val_s = TIP.class_affinity(sf, sf, sy, c, b_grid)
        rem, rem_counts = TIP.held_out_affinity(sf, sy, shot_folds(sy), c, b_grid)
        ch = TIP.search_tip(t, sf, sy, val_s, s_counts, rem, rem_counts, bal)
        if ch.rule == "fallback":
            log.info(
                "tip-adapter %d-shot seed %d: nothing to validate on, (a, b) = %s",
                k,
                seed,
                ch.value,
            )
        rec.add(FEW_SHOT, "few-shot", predict(t, ch, test_s, s_counts), ch, "tip-adapter", **draw)
        for p, counts, test_aff, union_aff in cached:
            val = val_s + union_aff[:, np.searchsorted(union, idx)]
            all_counts = s_counts + counts
            ch = TIP.search_tip(t, sf, sy, val, all_counts, rem, rem_counts, bal)
            pred = predict(t, ch, test_s + test_aff, all_counts)
            method = f"few-shot + {METHOD[p.protocol]}"
            rec.add(FEW_SHOT, method, pred, ch, "tip-adapter", p, **draw)


# ------------------------------------------------------------------------ reference


def reference_rows(task: Task, cfg) -> list[dict]:
    """The rows as the reference code computes them (:mod:`pipeline.evaluate.reference`):
    fixed alpha per dataset and shots, zero image-head rows for empty classes. The stage
    builds ``task`` with the reference's text heads and pool (cap, two-class captions)."""
    rec = Records(task)
    texts = _text_rows(task, rec, "reference")
    tx, c = task.test_feats, task.num_classes
    a0 = fixed(R.reference_alpha(task.dataset, 0), "reference")
    sums_of = []
    for p in task.primings:
        sums = class_sums(p.feats, p.labels, c)
        sums_of.append((p, sums))
        for suffix, text in texts:
            pred = _predict(tx, R.reference_weights(text, sums, a0.value))
            rec.add(p.protocol, METHOD[p.protocol] + suffix, pred, a0, priming=p)
    for k, seed, idx in shot_draws(task, cfg.shots, cfg.seeds):
        sf, sy = task.train_feats[idx], task.train_labels[idx]
        s_sums = class_sums(sf, sy, c)
        ak = fixed(R.reference_alpha(task.dataset, k), "reference")
        draw = {"shots": k, "seed": seed, "n_shots": len(idx)}
        pred = _predict(tx, R.reference_weights(task.text, s_sums, ak.value))
        rec.add(FEW_SHOT, "few-shot", pred, ak, **draw)
        for p, sums in sums_of:
            pred = _predict(tx, R.reference_weights(task.text, s_sums + sums, ak.value))
            rec.add(FEW_SHOT, f"few-shot + {METHOD[p.protocol]}", pred, ak, priming=p, **draw)
    return list(rec)
