"""The priming classifier's heads and shot sampling, in numpy over cached embeddings.

Formulas (Neural Priming, arXiv 2306.10191, and its reference code):

- text head: t_c = norm(mean_j norm(E_t(template_j(c)))); with CuPL (Pratt et al. 2023),
  T = norm((T_templates + T_cupl) / 2);
- image head: M_c = norm(sum of the unit features of class c) over the priming images (and
  the shots); a class with no feature takes its text row (the reference produced NaN, then a
  zero row: :mod:`pipeline.evaluate.reference` reproduces that);
- ensemble: W = alpha T + (1 - alpha) M; prediction argmax_c f . W_c.

Alpha is chosen in :mod:`pipeline.evaluate.alpha`; Tip-Adapter lives in
:mod:`pipeline.evaluate.tip`.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-12
# Rows x keys per block of the dense similarity matrices (64 MiB of float32).
_BLOCK_ELEMENTS = 1 << 24


def unit(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm, in float32 (zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def as_labels(labels: np.ndarray) -> np.ndarray:
    """Labels as a flat int64 array."""
    return np.asarray(labels, np.int64).reshape(-1)


def class_sums(feats: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, D]`` float32 sums of the L2-normalised features of each class.

    Computed block by block with a sort and ``np.add.reduceat`` (``np.add.at`` takes seconds
    on 100k x 512 rows). ``feats`` may be float16; an empty ``feats`` gives zeros ``[C, D]``.
    """
    feats = np.asarray(feats)
    labels = as_labels(labels)
    d = feats.shape[1] if feats.ndim == 2 else 0
    out = np.zeros((num_classes, d), np.float32)
    step = max(1, _BLOCK_ELEMENTS // max(d, 1))
    for s in range(0, len(labels), step):
        y = labels[s : s + step]
        order = np.argsort(y, kind="stable")
        ys = y[order]
        starts = np.flatnonzero(np.r_[True, ys[1:] != ys[:-1]])
        out[ys[starts]] += np.add.reduceat(unit(feats[s : s + step][order]), starts, axis=0)
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
    labels = as_labels(labels)
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
    return float(np.mean(predict(feats, weights) == as_labels(labels)))


# ---------------------------------------------------------------------------- shots


def sample_shots(labels: np.ndarray, shots: int, seed: int, num_classes: int) -> np.ndarray:
    """Indices (sorted, int64) of ``shots`` examples per class of ``labels``, all of a smaller class.

    ``labels`` are the train split's; the caller never passes test labels. The generator is
    seeded with ``(seed, shots)``, so each pair always draws the same examples whatever else
    runs (the reference drew shots unseeded).
    """
    labels = as_labels(labels)
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
    labels = as_labels(labels)
    order = np.argsort(labels, kind="stable")
    ys = labels[order]
    starts = np.searchsorted(ys, ys)  # first position of each label in sorted order
    fold = np.empty(len(labels), np.int64)
    fold[order] = np.arange(len(labels)) - starts
    return fold
