"""Tip-Adapter (Zhang et al., ECCV 2022), a training-free cache model, over cached embeddings.

logits = 100 f T^T + a A(f), with the cache term A(f)_c = exp(-b (1 - f K_c^T)) summed over
the keys K_c of class c (priming images and shots). Tip-Adapter was built for K-shot caches,
where every class has the same number of keys; a priming pool gives some classes thousands of
keys and others tens, and the sum then votes for the large classes. Primer balances the cache
by default: A(f)_c is the *mean* over class c's keys, times ``TIP_KEYS_SCALE`` (as if every
class had Tip-Adapter's 16 shots), so ``a`` keeps its published range.

(a, b) are searched on held-out examples (shots, or pool images against their caption
labels), never on test: each held-out example is scored with its own keys removed from the
cache (:func:`held_out_affinity`).
"""

from __future__ import annotations

import numpy as np

from pipeline.evaluate.alpha import Choice
from pipeline.evaluate.classify import _BLOCK_ELEMENTS, as_labels, unit

# Tip-Adapter's search ranges (the paper searches a in [0, ~10] and b in [1, ~12]; a reaches
# further here because a priming cache can outvote a noisy text head by more); a = 1, b = 5.5
# are its published defaults, used when nothing can be validated.
TIP_A_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
TIP_B_GRID = (1.0, 3.0, 5.5, 8.0, 11.0)
TIP_DEFAULT = (1.0, 5.5)
TIP_KEYS_SCALE = 16.0


def balance(affinity: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-class mean of a summed cache term: ``affinity / counts * TIP_KEYS_SCALE``.

    ``affinity`` is ``[..., C]`` sums over keys, ``counts`` the keys per class (broadcast
    against it); a class without keys contributes 0.
    """
    counts = np.asarray(counts, np.float32)
    return np.where(counts > 0, affinity / np.maximum(counts, 1.0), 0.0) * TIP_KEYS_SCALE


def class_affinity(
    queries: np.ndarray,
    keys: np.ndarray,
    key_labels: np.ndarray,
    num_classes: int,
    b_grid=TIP_B_GRID,
    batch: int | None = None,
) -> np.ndarray:
    """``[len(b_grid), Q, C]`` float32: ``exp(-b (1 - q K^T)) L`` (summed per class) for every b.

    Tip-Adapter's cache term for every sharpness ``b`` at once; ``a`` only scales it, so the
    (a, b) search reuses it. Keys are grouped by label and summed with ``np.add.reduceat``
    instead of a dense one-hot product; rows go in blocks of about 64 MiB of similarities.
    """
    q_all = np.asarray(queries)
    y = as_labels(key_labels)
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


def tip_logits(
    feats: np.ndarray,
    text_weights: np.ndarray,
    keys: np.ndarray,
    key_labels: np.ndarray,
    a: float,
    b: float,
    balanced: bool = True,
    batch: int = 4096,
) -> np.ndarray:
    """Tip-Adapter logits ``100 f T^T + a A(f)`` (float32 ``[N, C]``); ``balanced`` takes the
    per-class mean of the cache term (module docstring), else Tip-Adapter's sum."""
    t = np.asarray(text_weights, np.float32)
    out = 100.0 * np.asarray(feats, np.float32) @ t.T
    y = as_labels(key_labels)
    if len(y):
        aff = class_affinity(feats, keys, y, t.shape[0], (b,), batch)[0]
        if balanced:
            aff = balance(aff, np.bincount(y, minlength=t.shape[0]))
        out += a * aff
    return out


def search_tip(
    text_weights: np.ndarray,
    val_feats: np.ndarray,
    val_labels: np.ndarray,
    val_affinity: np.ndarray,
    key_counts: np.ndarray,
    removed_affinity: np.ndarray | None = None,
    removed_counts: np.ndarray | None = None,
    balanced: bool = True,
    a_grid=TIP_A_GRID,
    b_grid=TIP_B_GRID,
    rule: str = "cv-shots",
) -> Choice:
    """Tip-Adapter's (a, b) maximising held-out accuracy (never on the test split).

    Args:
        val_affinity: :func:`class_affinity` (sums) of the validation examples against the cache.
        key_counts: keys per class in the cache.
        removed_affinity: the part of ``val_affinity`` from keys held out with each example
            (itself, its fold), subtracted so nobody is scored against its own key;
            ``removed_counts`` ``[V, C]`` the keys removed per example. Examples whose class
            has no key left are not scored.
        balanced: score with the per-class mean cache term (:func:`balance`).

    Returns:
        a :class:`Choice` with ``value`` (a, b); Tip-Adapter's defaults (1, 5.5) with rule
        ``fallback`` when no example can be scored.
    """
    t = np.asarray(text_weights, np.float32)
    y = as_labels(val_labels)
    aff = val_affinity if removed_affinity is None else val_affinity - removed_affinity
    left = np.broadcast_to(np.asarray(key_counts), (len(y), t.shape[0]))
    if removed_counts is not None:
        left = left - removed_counts
    keep = left[np.arange(len(y)), y] > 0
    if not keep.any():
        return Choice(TIP_DEFAULT, "fallback", float("nan"), 0)
    zs = 100.0 * np.asarray(val_feats, np.float32)[keep] @ t.T
    aff, y, left = aff[:, keep], y[keep], left[keep]
    if balanced:
        aff = balance(aff, left)
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
    cache together with an example (its fold; a unique id each for leave-one-out; -1 for an
    example that is not a key at all). Returns ``([len(b_grid), V, C] affinity, [V, C] key
    counts)`` to pass to :func:`search_tip`.
    """
    f = unit(feats)
    y = as_labels(labels)
    g = as_labels(groups)
    aff = np.zeros((len(b_grid), len(y), num_classes), np.float32)
    counts = np.zeros((len(y), num_classes), np.int64)
    keyed = np.flatnonzero(g >= 0)
    uniq, inverse = np.unique(g[keyed], return_inverse=True)
    if len(uniq) == len(keyed):  # leave-one-out: each example removes only itself
        self_sim = np.einsum("nd,nd->n", f[keyed], f[keyed]) - 1.0
        for i, b in enumerate(b_grid):
            aff[i, keyed, y[keyed]] = np.exp(b * self_sim)
        counts[keyed, y[keyed]] = 1
        return aff, counts
    for j in range(len(uniq)):
        rows = keyed[inverse == j]
        sim = f[rows] @ f[rows].T - 1.0
        onehot = np.zeros((len(rows), num_classes), np.float32)
        onehot[np.arange(len(rows)), y[rows]] = 1.0
        for i, b in enumerate(b_grid):
            aff[i, rows] = np.exp(b * sim) @ onehot
        counts[rows] = onehot.sum(0).astype(np.int64)
    return aff, counts
