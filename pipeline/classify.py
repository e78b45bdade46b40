"""The priming classifier and its baselines, in numpy over cached embeddings.

Formulas (Neural Priming, arXiv 2306.10191, and its reference code):

- text head: t_c = norm(mean_j norm(E_t(template_j(c)))); with CuPL, T = norm((T_templates +
  T_cupl) / 2);
- image head: M_c = norm(sum of the unit features of class c) over the priming images (and
  the shots); a class with no feature takes its text row (the reference produced NaN);
- ensemble: W = alpha T + (1 - alpha) M; prediction argmax_c f . W_c.
- Tip-Adapter (Zhang et al. 2022): logits = 100 f T^T + a exp(-b (1 - f K^T)) L with cache
  keys K (priming images and shots) and one-hot values L.

``alpha`` can be chosen without test labels (:func:`choose_alpha`): leave-one-out over the
shots when there are shots; otherwise leave-one-out over the priming images themselves, whose
labels are their (noisy) caption labels.
"""

from __future__ import annotations

import numpy as np

ALPHA_GRID = np.round(np.linspace(0.0, 1.0, 21), 2)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def class_sums(feats: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, D]`` float32 sums of the unit features of each class."""
    f = _unit(feats) if len(feats) else np.zeros((0, 0), np.float32)
    d = f.shape[1] if len(feats) else 0
    s = np.zeros((num_classes, d), np.float32)
    if len(feats):
        np.add.at(s, np.asarray(labels, np.int64), f)
    return s


def image_head(text_weights: np.ndarray, feats: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """M: per class the normalised feature sum; the text row where a class has no feature."""
    t = np.asarray(text_weights, np.float32)
    if len(feats) == 0:
        return t.copy()
    s = class_sums(feats, labels, t.shape[0])
    norms = np.linalg.norm(s, axis=1, keepdims=True)
    return np.where(norms > 1e-12, s / np.maximum(norms, 1e-12), t).astype(np.float32)


def priming_weights(text_weights: np.ndarray, feats: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    """The ``[C, D]`` ensemble ``W = alpha T + (1 - alpha) M``.

    ``text_weights``: T, one row per class. ``feats``: ``[N, D]`` unit vectors (float16 is
    fine) with integer ``labels`` in ``[0, C)``. ``alpha`` in [0, 1]. Row c of M is the
    L2-normalised sum of the features of class c, or T's row c when class c has none (never
    zeros or NaN). Raises ``ValueError`` for alpha outside [0, 1] or labels outside [0, C).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    labels = np.asarray(labels, np.int64)
    t = np.asarray(text_weights, np.float32)
    if len(labels) and (labels.min() < 0 or labels.max() >= t.shape[0]):
        raise ValueError(f"labels must be in [0, {t.shape[0]})")
    return (alpha * t + (1.0 - alpha) * image_head(t, feats, labels)).astype(np.float32)


def predict(feats: np.ndarray, weights: np.ndarray, batch: int = 65536) -> np.ndarray:
    """argmax over ``feats @ weights.T`` (float32), in batches."""
    w = np.asarray(weights, np.float32)
    out = np.empty(len(feats), np.int64)
    for s in range(0, len(feats), batch):
        out[s : s + batch] = np.argmax(np.asarray(feats[s : s + batch], np.float32) @ w.T, axis=1)
    return out


def accuracy(feats: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(predict(feats, weights) == np.asarray(labels)))


def sample_shots(labels: np.ndarray, shots: int, seed: int, num_classes: int) -> np.ndarray:
    """Indices of ``shots`` examples per class (all of a smaller class), seeded, sorted.

    The generator is seeded with ``(seed, shots)``, so each (seed, shots) pair always draws the
    same examples whatever else runs.
    """
    labels = np.asarray(labels, np.int64)
    rng = np.random.default_rng([seed, shots])
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0 or shots <= 0:
            continue
        chosen.append(rng.choice(idx, size=min(shots, len(idx)), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def loo_alpha_scores(
    text_weights: np.ndarray,
    held_feats: np.ndarray,
    held_labels: np.ndarray,
    extra_feats: np.ndarray,
    extra_labels: np.ndarray,
    grid: np.ndarray = ALPHA_GRID,
) -> np.ndarray:
    """Leave-one-out accuracy of each alpha in ``grid``.

    The image head is built from ``held`` plus ``extra`` features; each held-out example is
    classified with its own feature removed from its class sum (closed form, no refit).
    """
    t = np.asarray(text_weights, np.float32)
    c = t.shape[0]
    f = _unit(held_feats)
    y = np.asarray(held_labels, np.int64)
    s = class_sums(held_feats, y, c)
    if len(extra_feats):
        s += class_sums(extra_feats, extra_labels, c)
    norms = np.linalg.norm(s, axis=1)
    m = np.where(norms[:, None] > 1e-12, s / np.maximum(norms, 1e-12)[:, None], t)
    img = f @ m.T  # [N, C] with the example still inside its class
    own = s[y] - f  # class sum without the example
    own_norm = np.linalg.norm(own, axis=1)
    own_sim = np.where(own_norm > 1e-6, np.einsum("nd,nd->n", f, own) / np.maximum(own_norm, 1e-12), np.einsum("nd,nd->n", f, t[y]))
    img[np.arange(len(y)), y] = own_sim
    txt = f @ t.T
    return np.array([np.mean(np.argmax(a * txt + (1 - a) * img, axis=1) == y) for a in grid], np.float64)


def choose_alpha(
    text_weights: np.ndarray,
    shot_feats: np.ndarray,
    shot_labels: np.ndarray,
    priming_feats: np.ndarray,
    priming_labels: np.ndarray,
    grid: np.ndarray = ALPHA_GRID,
    max_held: int = 20000,
    seed: int = 0,
) -> float:
    """Choose alpha without test labels.

    With shots: leave-one-out over the shots (the head holds the other shots and the priming
    images). Without shots: leave-one-out over the priming images (at most ``max_held`` of
    them, a seeded sample), scored against their caption labels. Ties go to the larger alpha
    (more weight on the text head, the safer default); no data at all gives 1.0 (zero-shot).
    """
    if len(shot_labels):
        held_f, held_y, extra_f, extra_y = shot_feats, shot_labels, priming_feats, priming_labels
    elif len(priming_labels):
        idx = np.arange(len(priming_labels))
        if len(idx) > max_held:
            idx = np.sort(np.random.default_rng(seed).choice(idx, max_held, replace=False))
            rest = np.setdiff1d(np.arange(len(priming_labels)), idx)
            extra_f, extra_y = priming_feats[rest], priming_labels[rest]
        else:
            extra_f, extra_y = np.zeros((0, priming_feats.shape[1]), np.float32), np.zeros(0, np.int64)
        held_f, held_y = priming_feats[idx], priming_labels[idx]
    else:
        return 1.0
    scores = loo_alpha_scores(text_weights, held_f, held_y, extra_f, extra_y, grid)
    best = np.flatnonzero(scores == scores.max())
    return float(grid[best[-1]])


# ---------------------------------------------------------------------- Tip-Adapter


def tip_logits(feats: np.ndarray, text_weights: np.ndarray, keys: np.ndarray, key_labels: np.ndarray, a: float, b: float, batch: int = 4096) -> np.ndarray:
    """Tip-Adapter logits ``100 f T^T + a exp(-b (1 - f K^T)) L`` (float32)."""
    t = np.asarray(text_weights, np.float32)
    k = np.asarray(keys, np.float32)
    onehot = np.zeros((len(key_labels), t.shape[0]), np.float32)
    onehot[np.arange(len(key_labels)), np.asarray(key_labels, np.int64)] = 1.0
    out = np.empty((len(feats), t.shape[0]), np.float32)
    for s in range(0, len(feats), batch):
        f = np.asarray(feats[s : s + batch], np.float32)
        logits = 100.0 * f @ t.T
        if len(k):
            logits += a * np.exp(-b * (1.0 - f @ k.T)) @ onehot
        out[s : s + batch] = logits
    return out


def search_tip(
    text_weights: np.ndarray,
    cache_feats: np.ndarray,
    cache_labels: np.ndarray,
    val_feats: np.ndarray,
    val_labels: np.ndarray,
    a_grid=(0.0, 0.5, 1.0, 2.0, 4.0, 8.0),
    b_grid=(1.0, 3.0, 5.5, 8.0, 11.0),
) -> tuple[float, float]:
    """(a, b) maximising accuracy on the validation examples (never the test split)."""
    best, best_ab = -1.0, (1.0, 5.5)
    for a in a_grid:
        for b in b_grid:
            acc = float(np.mean(np.argmax(tip_logits(val_feats, text_weights, cache_feats, cache_labels, a, b), 1) == val_labels)) if len(val_labels) else 0.0
            if acc > best + 1e-12:
                best, best_ab = acc, (float(a), float(b))
    return best_ab
