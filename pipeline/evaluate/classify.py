"""The priming classifier and its baselines, in numpy over cached embeddings.

Formulas (Neural Priming, arXiv 2306.10191, and its reference code):

- text head: t_c = norm(mean_j norm(E_t(template_j(c)))); with CuPL (Pratt et al. 2023),
  T = norm((T_templates + T_cupl) / 2);
- image head: M_c = norm(sum of the unit features of class c) over the priming images (and
  the shots); a class with no feature takes its text row (the reference produced NaN);
- ensemble: W = alpha T + (1 - alpha) M; prediction argmax_c f . W_c;
- Tip-Adapter (Zhang et al., ECCV 2022): logits = 100 f T^T + a exp(-b (1 - f K^T)) L with
  cache keys K (priming images and shots) and one-hot values L.

Choosing alpha (and Tip-Adapter's a, b) never looks at test labels (:func:`choose_alpha`):

- with shots: k-fold cross-validation over the shots, fold j holding out the j-th shot of
  every class, so each fold's head is built symmetrically from k - 1 shots per class (plus all
  priming images). Leave-one-out would compare the held-out class's (k - 1)-shot centroid with
  the other classes' k-shot centroids, a bias toward text at small k;
- without shots: leave-one-out over the priming images themselves, scored against their
  caption labels (each image is classified by the head built without it, in closed form by
  subtracting its feature from its class sum). This measures how well the centroid head
  separates the classes as the captions define them; caption labels are noisy and priming
  images are closer to their own centroids than test images are, so the rule leans toward
  the image head when the pool is clean and toward text when captions disagree with images;
- a held-out example whose class has nothing else in the head is not scored: its class row
  would be pure text while every rival has images, which always favours alpha = 1. When no
  example can be scored (1 shot per class, no priming images) the caller's fallback is used;
- scores are smoothed over neighbouring grid points ([1, 2, 1] / 4) before the argmax, as a
  few hundred held-out examples make single grid points noisy; among tied best points the
  middle one wins (the larger of two middles, nearer zero-shot CLIP).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALPHA_GRID = np.round(np.linspace(0.0, 1.0, 21), 2)
# Tip-Adapter's search ranges (the paper searches a in [0, ~10] and b in [1, ~12]); a = 1,
# b = 5.5 are its published defaults, used when nothing can be validated.
TIP_A_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
TIP_B_GRID = (1.0, 3.0, 5.5, 8.0, 11.0)
TIP_DEFAULT = (1.0, 5.5)
_EPS = 1e-12
# Rows x keys per block of the dense similarity matrices (64 MiB of float32).
_BLOCK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Choice:
    """An automatically chosen setting: ``value`` (alpha, or (a, b) for Tip-Adapter), ``rule``
    (``cv-shots``, ``loo-priming`` or ``fallback``), ``score`` (held-out accuracy, NaN for a
    fallback) and ``n_held`` (held-out examples scored)."""

    value: float | tuple[float, float]
    rule: str
    score: float
    n_held: int


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def _labels(labels: np.ndarray) -> np.ndarray:
    return np.asarray(labels, np.int64).reshape(-1)


def class_sums(feats: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, D]`` float32 sums of the L2-normalised features of each class.

    Computed block by block with a sort and ``np.add.reduceat`` (``np.add.at`` takes seconds
    on 100k x 512 rows). ``feats`` may be float16; an empty ``feats`` gives zeros ``[C, D]``.
    """
    feats = np.asarray(feats)
    labels = _labels(labels)
    d = feats.shape[1] if feats.ndim == 2 else 0
    out = np.zeros((num_classes, d), np.float32)
    step = max(1, _BLOCK_ELEMENTS // max(d, 1))
    for s in range(0, len(labels), step):
        y = labels[s : s + step]
        order = np.argsort(y, kind="stable")
        ys = y[order]
        starts = np.flatnonzero(np.r_[True, ys[1:] != ys[:-1]])
        out[ys[starts]] += np.add.reduceat(_unit(feats[s : s + step][order]), starts, axis=0)
    return out


def weights_from_sums(text_weights: np.ndarray, sums: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha T + (1 - alpha) M`` with ``M`` the normalised ``sums`` (the text row where a
    class sums to zero). The building block of :func:`priming_weights`."""
    t = np.asarray(text_weights, np.float32)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    m = np.where(norms > 1e-6, sums / np.maximum(norms, _EPS), t)
    return (alpha * t + (1.0 - alpha) * m).astype(np.float32)


def image_head(text_weights: np.ndarray, feats: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """M: per class the normalised feature sum; the text row where a class has no feature."""
    t = np.asarray(text_weights, np.float32)
    return weights_from_sums(t, class_sums(feats, labels, t.shape[0]), 0.0)


def priming_weights(
    text_weights: np.ndarray, feats: np.ndarray, labels: np.ndarray, alpha: float
) -> np.ndarray:
    """The ``[C, D]`` float32 ensemble ``W = alpha T + (1 - alpha) M``.

    Args:
        text_weights: T, ``[C, D]``, one row per class.
        feats: ``[N, D]`` unit vectors (float16 is fine; computed in float32), N may be 0.
        labels: ``[N]`` integer labels in ``[0, C)``.
        alpha: weight of the text head, in [0, 1].

    Row c of M is the L2-normalised sum of the features of class c, or T's row c when class c
    has none (never zeros or NaN).

    Raises:
        ValueError: alpha outside [0, 1], labels outside [0, C), or mismatched shapes.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    t = np.asarray(text_weights, np.float32)
    labels = _labels(labels)
    feats = np.asarray(feats)
    if len(labels) != len(feats):
        raise ValueError(f"{len(feats)} features but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= t.shape[0]):
        raise ValueError(f"labels must be in [0, {t.shape[0]})")
    if len(labels) and feats.shape[1] != t.shape[1]:
        raise ValueError(f"features have dim {feats.shape[1]}, text weights {t.shape[1]}")
    return weights_from_sums(t, class_sums(feats, labels, t.shape[0]), alpha)


def predict(feats: np.ndarray, weights: np.ndarray, batch: int = 65536) -> np.ndarray:
    """``argmax_c feats @ weights.T`` computed in float32, in batches; int64 ``[N]``."""
    w = np.asarray(weights, np.float32)
    out = np.empty(len(feats), np.int64)
    for s in range(0, len(feats), batch):
        out[s : s + batch] = np.argmax(np.asarray(feats[s : s + batch], np.float32) @ w.T, axis=1)
    return out


def accuracy(feats: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """Top-1 accuracy of ``weights`` on ``feats`` (NaN when there is nothing to score)."""
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(predict(feats, weights) == _labels(labels)))


# ---------------------------------------------------------------------------- shots


def sample_shots(labels: np.ndarray, shots: int, seed: int, num_classes: int) -> np.ndarray:
    """Indices (sorted, int64) of ``shots`` examples per class of ``labels``, all of a smaller class.

    ``labels`` are the train split's; the caller never passes test labels. The generator is
    seeded with ``(seed, shots)``, so each pair always draws the same examples whatever else
    runs (the reference drew shots unseeded).
    """
    labels = _labels(labels)
    if shots <= 0 or len(labels) == 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng([seed, shots])
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    chosen = []
    for c in range(num_classes):
        idx = order[bounds[c] : bounds[c + 1]]
        if len(idx):
            chosen.append(rng.choice(idx, size=min(shots, len(idx)), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def shot_folds(labels: np.ndarray) -> np.ndarray:
    """Fold of each shot: its rank among the shots of its class in row order (0..k-1)."""
    labels = _labels(labels)
    order = np.argsort(labels, kind="stable")
    ys = labels[order]
    starts = np.searchsorted(ys, ys)  # first position of each label in sorted order
    fold = np.empty(len(labels), np.int64)
    fold[order] = np.arange(len(labels)) - starts
    return fold


# ------------------------------------------------------------------- choosing alpha


def _pick(scores: np.ndarray, grid: np.ndarray) -> int:
    """Index of the best grid point after [1, 2, 1] / 4 smoothing.

    Among tied best points (common with a few hundred held-out examples) the middle one wins,
    the larger of two middles: an end of a plateau is where accuracy starts to fall.
    """
    padded = np.r_[scores[:1], scores, scores[-1:]]
    smooth = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4
    best = np.flatnonzero(smooth >= smooth.max() - 1e-9)
    best = best[np.argsort(np.asarray(grid)[best], kind="stable")]
    return int(best[len(best) // 2])


def cv_alpha_scores(
    text_weights: np.ndarray,
    shot_feats: np.ndarray,
    shot_labels: np.ndarray,
    base_sums: np.ndarray | None = None,
    grid: np.ndarray = ALPHA_GRID,
) -> tuple[np.ndarray, int]:
    """k-fold accuracy of each alpha in ``grid`` over the shots: ``(scores, n_scored)``.

    Fold j holds out the j-th shot of every class; its head holds the other shots plus
    ``base_sums`` (the priming images' :func:`class_sums`, or None). Held-out shots whose
    class has nothing else in the head are not scored; ``n_scored`` 0 gives NaN scores.
    """
    t = np.asarray(text_weights, np.float32)
    c = t.shape[0]
    y = _labels(shot_labels)
    f = _unit(shot_feats)
    base = np.zeros_like(t) if base_sums is None else np.asarray(base_sums, np.float32)
    total = base + class_sums(f, y, c)
    base_has = np.linalg.norm(base, axis=1) > 1e-6
    counts = np.bincount(y, minlength=c)
    folds = shot_folds(y)
    grid = np.asarray(grid, np.float32)
    correct = np.zeros(len(grid), np.int64)
    n_scored = 0
    for j in range(int(folds.max()) + 1 if len(y) else 0):
        held = folds == j
        fy = y[held]
        keep = base_has[fy] | (counts[fy] > 1)  # the class keeps data without this shot
        if not keep.any():
            continue
        ff = f[held][keep]
        fy = fy[keep]
        sums = total - class_sums(f[held], y[held], c)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        m = np.where(norms > 1e-6, sums / np.maximum(norms, _EPS), t)
        txt, img = ff @ t.T, ff @ m.T
        for i, a in enumerate(grid):
            correct[i] += int(np.sum(np.argmax(a * txt + (1 - a) * img, axis=1) == fy))
        n_scored += len(fy)
    if n_scored == 0:
        return np.full(len(grid), np.nan), 0
    return correct / n_scored, n_scored


def loo_alpha_scores(
    text_weights: np.ndarray,
    held_feats: np.ndarray,
    held_labels: np.ndarray,
    sums: np.ndarray,
    counts: np.ndarray,
    grid: np.ndarray = ALPHA_GRID,
) -> tuple[np.ndarray, int]:
    """Leave-one-out accuracy of each alpha over ``held`` examples: ``(scores, n_scored)``.

    ``sums`` / ``counts`` describe the full head and include every held example; each is
    classified with its own feature subtracted from its class sum (closed form, no refit).
    Examples alone in their class are not scored.
    """
    t = np.asarray(text_weights, np.float32)
    y = _labels(held_labels)
    keep = np.asarray(counts)[y] > 1
    f, y = _unit(held_feats)[keep], y[keep]
    if len(y) == 0:
        return np.full(len(grid), np.nan), 0
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    m = np.where(norms > 1e-6, sums / np.maximum(norms, _EPS), t)
    txt = f @ t.T
    img = f @ m.T  # the example still inside its class ...
    own = sums[y] - f  # ... so its own class is rescored without it
    own_norm = np.maximum(np.linalg.norm(own, axis=1), _EPS)
    img[np.arange(len(y)), y] = np.einsum("nd,nd->n", f, own) / own_norm
    scores = [np.mean(np.argmax(a * txt + (1 - a) * img, axis=1) == y) for a in grid]
    return np.asarray(scores, np.float64), len(y)


def choose_alpha(
    text_weights: np.ndarray,
    shot_feats: np.ndarray,
    shot_labels: np.ndarray,
    priming_feats: np.ndarray,
    priming_labels: np.ndarray,
    grid: np.ndarray = ALPHA_GRID,
    max_held: int = 20000,
    seed: int = 0,
    fallback: float = 0.6,
    priming_sums: np.ndarray | None = None,
) -> Choice:
    """Choose alpha without test labels (the rule is in the module docstring).

    Args:
        text_weights: ``[C, D]`` text head.
        shot_feats, shot_labels: the train-split shots (may be empty).
        priming_feats, priming_labels: the priming images with caption labels (may be empty).
        grid: candidate alphas.
        max_held: zero-shot rule: at most this many priming images are held out (a sample
            seeded by ``seed``; the head always holds all of them).
        fallback: alpha when nothing can be validated (1 shot per class and no priming).
        priming_sums: precomputed ``class_sums(priming_feats, priming_labels, C)``.

    Returns:
        a :class:`Choice` whose ``value`` is the alpha.
    """
    c = np.asarray(text_weights).shape[0]
    grid = np.asarray(grid)
    p_y = _labels(priming_labels)
    if len(p_y) and priming_sums is None:
        priming_sums = class_sums(priming_feats, p_y, c)
    if len(_labels(shot_labels)):
        scores, n = cv_alpha_scores(text_weights, shot_feats, shot_labels, priming_sums, grid)
        rule = "cv-shots"
    elif len(p_y):
        idx = np.arange(len(p_y))
        if len(idx) > max_held:
            idx = np.sort(np.random.default_rng(seed).choice(idx, max_held, replace=False))
        counts = np.bincount(p_y, minlength=c)
        scores, n = loo_alpha_scores(
            text_weights, np.asarray(priming_feats)[idx], p_y[idx], priming_sums, counts, grid
        )
        rule = "loo-priming"
    else:
        return Choice(1.0, "zero-shot", float("nan"), 0)  # nothing but text: W = T
    if n == 0:
        return Choice(float(fallback), "fallback", float("nan"), 0)
    i = _pick(scores, grid)
    return Choice(float(grid[i]), rule, float(scores[i]), n)


# ---------------------------------------------------------------------- Tip-Adapter


def tip_logits(
    feats: np.ndarray,
    text_weights: np.ndarray,
    keys: np.ndarray,
    key_labels: np.ndarray,
    a: float,
    b: float,
    batch: int = 4096,
) -> np.ndarray:
    """Tip-Adapter logits ``100 f T^T + a exp(-b (1 - f K^T)) L`` (float32 ``[N, C]``)."""
    t = np.asarray(text_weights, np.float32)
    out = 100.0 * np.asarray(feats, np.float32) @ t.T
    if len(key_labels):
        out += a * class_affinity(feats, keys, key_labels, t.shape[0], (b,), batch)[0]
    return out


def class_affinity(
    queries: np.ndarray,
    keys: np.ndarray,
    key_labels: np.ndarray,
    num_classes: int,
    b_grid=TIP_B_GRID,
    batch: int | None = None,
) -> np.ndarray:
    """``[len(b_grid), Q, C]`` float32: ``exp(-b (1 - q K^T)) L`` for every b.

    Tip-Adapter's cache term for every sharpness ``b`` at once; ``a`` only scales it, so the
    (a, b) search reuses it. Keys are grouped by label and summed with ``np.add.reduceat``
    instead of a dense one-hot product; rows go in blocks of about 64 MiB of similarities.
    """
    q_all = np.asarray(queries)
    y = _labels(key_labels)
    out = np.zeros((len(b_grid), len(q_all), num_classes), np.float32)
    if len(y) == 0 or len(q_all) == 0:
        return out
    order = np.argsort(y, kind="stable")
    ys = y[order]
    starts = np.flatnonzero(np.r_[True, ys[1:] != ys[:-1]])
    cols = ys[starts]
    k = np.asarray(keys, np.float32)[order]
    step = batch or max(1, _BLOCK_ELEMENTS // len(y))
    for s in range(0, len(q_all), step):
        sim = np.asarray(q_all[s : s + step], np.float32) @ k.T
        sim -= 1.0
        tmp = np.empty_like(sim)
        for i, b in enumerate(b_grid):
            np.multiply(sim, np.float32(b), out=tmp)  # in place: this loop is memory-bound
            np.exp(tmp, out=tmp)
            out[i, s : s + step][:, cols] = np.add.reduceat(tmp, starts, axis=1)
    return out


def search_tip(
    text_weights: np.ndarray,
    val_feats: np.ndarray,
    val_labels: np.ndarray,
    val_affinity: np.ndarray,
    removed_affinity: np.ndarray | None = None,
    key_counts: np.ndarray | None = None,
    removed_counts: np.ndarray | None = None,
    a_grid=TIP_A_GRID,
    b_grid=TIP_B_GRID,
    rule: str = "cv-shots",
) -> Choice:
    """Tip-Adapter's (a, b) maximising held-out accuracy (never on the test split).

    Args:
        val_affinity: :func:`class_affinity` of the validation examples against the cache.
        removed_affinity: the part of ``val_affinity`` that comes from keys held out with each
            example (itself, its fold), subtracted so nobody is scored against its own key.
        key_counts: keys per class in the cache; ``removed_counts`` ``[V, C]`` keys removed
            per example. Examples whose class has no key left are not scored.

    Returns:
        a :class:`Choice` with ``value`` (a, b); Tip-Adapter's defaults (1, 5.5) with rule
        ``fallback`` when no example can be scored.
    """
    t = np.asarray(text_weights, np.float32)
    y = _labels(val_labels)
    aff = val_affinity if removed_affinity is None else val_affinity - removed_affinity
    keep = np.ones(len(y), bool)
    if key_counts is not None:
        left = np.asarray(key_counts)[y] - (
            0 if removed_counts is None else removed_counts[np.arange(len(y)), y]
        )
        keep = left > 0
    if not keep.any():
        return Choice(TIP_DEFAULT, "fallback", float("nan"), 0)
    zs = 100.0 * np.asarray(val_feats, np.float32)[keep] @ t.T
    aff, y = aff[:, keep], y[keep]
    best, best_ab = -1.0, TIP_DEFAULT
    # a ascending: among equal accuracies the smaller cache weight (closer to zero-shot) wins.
    for a in sorted(a_grid):
        for i, b in enumerate(b_grid):
            acc = float(np.mean(np.argmax(zs + a * aff[i], axis=1) == y))
            if acc > best + 1e-12:
                best, best_ab = acc, (float(a), float(b))
    return Choice(best_ab, rule, best, int(len(y)))


def held_out_affinity(
    feats: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    num_classes: int,
    b_grid=TIP_B_GRID,
) -> tuple[np.ndarray, np.ndarray]:
    """What each example's own group contributes to its cache term, and the keys it removes.

    For validation examples that are also cache keys, ``groups`` says which keys leave the
    cache together with an example (its fold; a unique id each for leave-one-out). Returns
    ``([len(b_grid), V, C] affinity, [V, C] key counts)`` to pass to :func:`search_tip`.
    """
    f = _unit(feats)
    y = _labels(labels)
    g = _labels(groups)
    aff = np.zeros((len(b_grid), len(y), num_classes), np.float32)
    counts = np.zeros((len(y), num_classes), np.int64)
    uniq, inverse = np.unique(g, return_inverse=True)
    if len(uniq) == len(g):  # leave-one-out: each example removes only itself
        self_sim = np.einsum("nd,nd->n", f, f) - 1.0
        for i, b in enumerate(b_grid):
            aff[i, np.arange(len(y)), y] = np.exp(b * self_sim)
        counts[np.arange(len(y)), y] = 1
        return aff, counts
    for j in range(len(uniq)):
        rows = np.flatnonzero(inverse == j)
        sim = f[rows] @ f[rows].T - 1.0
        onehot = np.zeros((len(rows), num_classes), np.float32)
        onehot[np.arange(len(rows)), y[rows]] = 1.0
        for i, b in enumerate(b_grid):
            aff[i, rows] = np.exp(b * sim) @ onehot
        counts[rows] = onehot.sum(0).astype(np.int64)
    return aff, counts
