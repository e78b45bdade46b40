"""Choosing alpha, the text head's weight in W = alpha T + (1 - alpha) M, without test labels.

With shots (``cv-shots``): k-fold cross-validation over the shots, fold j holding out the j-th
shot of every class, so each fold's head is built symmetrically from k - 1 shots per class
plus the priming images (leave-one-out would compare the held-out class's (k - 1)-shot
centroid with the others' k-shot ones, a bias toward text at small k).

Without shots the priming pool is all there is, and ``primer subset`` builds it with the CLIP
filter's ``require_agreement``: every kept image is one the text head already classifies as
its caption says. Leave-one-out over the kept images (``loo-kept``, the rule this module used
to apply) then scores alpha = 1 at 100% and collapses to zero-shot CLIP. Rules compared on
the synthetic worlds of :mod:`pipeline.evaluate.worlds` (``python bench/alpha.py``; figures in
docs/evaluation.md):

- ``pool``: accuracy against caption labels over the pool *before* the filter (images the
  text head gets wrong included; kept images scored leave-one-out). Needs no target image,
  but LAION images sit closer to their own class means than the task's images do, so it
  leans toward the image head;
- ``knn``: transductive, over unlabelled target images: the chance-corrected agreement
  (Cohen's kappa) of each image's predicted class with its 10 nearest target neighbours'
  (the cluster assumption: a good head's boundaries avoid dense regions). Accurate while
  neighbours share classes; where target images cluster by a nuisance (style, background)
  it rewards heads that follow the nuisance, again toward the image head;
- ``pool+knn`` (the default without shots): the larger of the two alphas. Both rules err
  toward the image head, each for its own reason, and the text head carries no pool bias,
  so the more conservative estimate errs least: on the standard worlds it is as close to the
  best alpha as ``knn`` alone, and on the stress worlds (nuisance styles), where ``knn``
  breaks and ``pool`` drifts, it is closer than either.

The zero-shot priming rows take their target images from the train split (without labels;
``evaluate.alpha_target: none`` keeps to the pool alone), the transductive rows from the test
split the selection already used. Scores are smoothed over neighbouring grid points
([1, 2, 1] / 4) before the argmax; among tied best points the middle one wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.evaluate.classify import _EPS, as_labels, class_sums, shot_folds, unit

ALPHA_GRID = np.round(np.linspace(0.0, 1.0, 21), 2)
KNN_K = 10


@dataclass(frozen=True)
class Choice:
    """An automatically chosen setting: ``value`` (alpha, or (a, b) for Tip-Adapter), ``rule``
    (``cv-shots``, ``pool``, ``knn-train``, ``pool+knn-test``, ..., ``fallback``, ``fixed``),
    ``score`` (the rule's score at ``value``, NaN for a fallback or a fixed value) and
    ``n_held`` (examples scored)."""

    value: float | tuple[float, float]
    rule: str
    score: float
    n_held: int


def pick(scores: np.ndarray, grid: np.ndarray = ALPHA_GRID) -> int:
    """Index of the best grid point after [1, 2, 1] / 4 smoothing.

    Among tied best points (common with a few hundred held-out examples) the middle one wins,
    the larger of two middles: an end of a plateau is where accuracy starts to fall.
    """
    scores = np.asarray(scores, np.float64)
    padded = np.r_[scores[:1], scores, scores[-1:]]
    smooth = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4
    best = np.flatnonzero(smooth >= smooth.max() - 1e-9)
    best = best[np.argsort(np.asarray(grid)[best], kind="stable")]
    return int(best[len(best) // 2])


def _image_rows(text: np.ndarray, sums: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.where(norms > 1e-6, sums / np.maximum(norms, _EPS), text)


def _grid_hits(txt: np.ndarray, img: np.ndarray, y: np.ndarray, grid) -> np.ndarray:
    """Correct predictions per alpha from the two heads' scores (``[N, C]`` each)."""
    return np.array([int(np.sum(np.argmax(a * txt + (1 - a) * img, axis=1) == y)) for a in grid])


# ----------------------------------------------------------------------- with shots


def cv_alpha_scores(
    text_weights: np.ndarray,
    shot_feats: np.ndarray,
    shot_labels: np.ndarray,
    base_sums: np.ndarray | None = None,
    grid: np.ndarray = ALPHA_GRID,
) -> tuple[np.ndarray, int]:
    """k-fold accuracy of each alpha in ``grid`` over the shots: ``(scores, n_scored)``.

    Fold j holds out the j-th shot of every class; its head holds the other shots plus
    ``base_sums`` (the priming images' class sums, or None). Held-out shots whose class has
    nothing else in the head are not scored (their row would be pure text while every rival
    has images, which favours alpha = 1); ``n_scored`` 0 gives NaN scores.
    """
    t = np.asarray(text_weights, np.float32)
    c = t.shape[0]
    y = as_labels(shot_labels)
    f = unit(shot_feats)
    base = np.zeros_like(t) if base_sums is None else np.asarray(base_sums, np.float32)
    total = base + class_sums(f, y, c)
    base_has = np.linalg.norm(base, axis=1) > 1e-6
    counts = np.bincount(y, minlength=c)
    folds = shot_folds(y)
    correct = np.zeros(len(grid), np.int64)
    n_scored = 0
    for j in range(int(folds.max()) + 1 if len(y) else 0):
        held = folds == j
        fy = y[held]
        keep = base_has[fy] | (counts[fy] > 1)  # the class keeps data without this shot
        if not keep.any():
            continue
        ff = f[held][keep]
        m = _image_rows(t, total - class_sums(f[held], y[held], c))
        correct += _grid_hits(ff @ t.T, ff @ m.T, fy[keep], grid)
        n_scored += int(keep.sum())
    if n_scored == 0:
        return np.full(len(grid), np.nan), 0
    return correct / n_scored, n_scored


# -------------------------------------------------------------------- without shots


def pool_alpha_scores(
    text_weights: np.ndarray,
    sums: np.ndarray,
    counts: np.ndarray,
    held_feats: np.ndarray,
    held_labels: np.ndarray,
    in_head: np.ndarray,
    grid: np.ndarray = ALPHA_GRID,
) -> tuple[np.ndarray, int]:
    """Accuracy of each alpha against caption labels over held-out pool images.

    ``sums`` / ``counts`` describe the head (the priming images). ``in_head[i]`` says held
    image ``i`` is one of them: it is then scored with its own feature removed from its class
    (closed form, no refit), and not scored when it is alone in its class. Images outside the
    head (those the filter dropped) are scored against the head as it is. Returns
    ``(scores, n_scored)``; NaN scores when nothing can be scored.
    """
    t = np.asarray(text_weights, np.float32)
    y = as_labels(held_labels)
    in_head = np.asarray(in_head, bool)
    keep = ~in_head | (np.asarray(counts)[y] > 1)
    f, y, own_row = unit(held_feats)[keep], y[keep], in_head[keep]
    if len(y) == 0:
        return np.full(len(grid), np.nan), 0
    txt = f @ t.T
    img = f @ _image_rows(t, sums).T
    rows = np.flatnonzero(own_row)
    own = sums[y[rows]] - f[rows]  # its class without it
    own_norm = np.maximum(np.linalg.norm(own, axis=1), _EPS)
    img[rows, y[rows]] = np.einsum("nd,nd->n", f[rows], own) / own_norm
    return _grid_hits(txt, img, y, grid) / len(y), len(y)


def loo_alpha_scores(
    text_weights: np.ndarray,
    held_feats: np.ndarray,
    held_labels: np.ndarray,
    sums: np.ndarray,
    counts: np.ndarray,
    grid: np.ndarray = ALPHA_GRID,
) -> tuple[np.ndarray, int]:
    """Leave-one-out accuracy over priming images that are all in the head (``loo-kept``).

    Kept for comparison (bench/alpha.py): over an agreement-filtered pool it favours alpha = 1.
    """
    held = np.ones(len(as_labels(held_labels)), bool)
    return pool_alpha_scores(text_weights, sums, counts, held_feats, held_labels, held, grid)


def neighbours(feats: np.ndarray, k: int = KNN_K, knn_cfg=None) -> np.ndarray:
    """``[N, k]`` indices of each row's ``k`` nearest other rows (cosine, FAISS; -1 padding)."""
    from pipeline.select.knn import search

    x = unit(feats)
    _, idx = search(x, x, k + 1, knn_cfg)
    # Each row's own index (first, unless an identical row ties with it) moves to the end.
    is_self = idx == np.arange(len(x))[:, None]
    idx = np.take_along_axis(idx, np.argsort(is_self, axis=1, kind="stable"), axis=1)[:, :k]
    return np.where(idx == np.arange(len(x))[:, None], -1, idx)


def knn_alpha_scores(
    text_weights: np.ndarray,
    sums: np.ndarray,
    target_feats: np.ndarray,
    nn: np.ndarray | None = None,
    grid: np.ndarray = ALPHA_GRID,
    knn_cfg=None,
) -> tuple[np.ndarray, int]:
    """Kappa of neighbour agreement per alpha over unlabelled target images.

    For each alpha the target images are classified; the score is the fraction of
    (image, neighbour) pairs predicted alike, corrected for chance agreement given the
    predicted class frequencies: ``(observed - expected) / (1 - expected)``, so a head that
    sends everything to a few classes gains nothing. ``nn`` are precomputed
    :func:`neighbours`. Returns ``(scores, n_images)``; NaN scores with fewer than 2 images.
    """
    f = unit(target_feats)
    t = np.asarray(text_weights, np.float32)
    if len(f) < 2:
        return np.full(len(grid), np.nan), 0
    nn = neighbours(f, KNN_K, knn_cfg) if nn is None else nn
    valid = nn >= 0
    txt, img = f @ t.T, f @ _image_rows(t, sums).T
    scores = []
    for a in grid:
        p = np.argmax(a * txt + (1 - a) * img, axis=1)
        observed = np.mean((p[np.maximum(nn, 0)] == p[:, None])[valid])
        freq = np.bincount(p, minlength=t.shape[0]) / len(p)
        expected = float(np.sum(freq**2))
        scores.append((observed - expected) / max(1.0 - expected, _EPS))
    return np.asarray(scores, np.float64), len(f)


def choose_alpha_shots(
    text_weights: np.ndarray,
    shot_feats: np.ndarray,
    shot_labels: np.ndarray,
    priming_sums: np.ndarray | None = None,
    fallback: float = 0.6,
    grid: np.ndarray = ALPHA_GRID,
) -> Choice:
    """Alpha for a head of shots (plus priming images): rule ``cv-shots``, or ``fallback``
    when no shot can be validated (1 shot per class and no priming image)."""
    scores, n = cv_alpha_scores(text_weights, shot_feats, shot_labels, priming_sums, grid)
    if n == 0:
        return Choice(float(fallback), "fallback", float("nan"), 0)
    i = pick(scores, grid)
    return Choice(float(grid[i]), "cv-shots", float(scores[i]), n)


def choose_alpha_priming(
    text_weights: np.ndarray,
    sums: np.ndarray,
    counts: np.ndarray,
    held: tuple[np.ndarray, np.ndarray, np.ndarray],
    target: np.ndarray | None = None,
    target_name: str = "test",
    nn: np.ndarray | None = None,
    fallback: float = 0.6,
    grid: np.ndarray = ALPHA_GRID,
    knn_cfg=None,
) -> Choice:
    """Alpha for a head of priming images without shots (rule ``pool+knn``, module docstring).

    Args:
        sums, counts: the priming images' class sums and counts.
        held: ``(feats, caption labels, in_head)`` of the pool before filtering (a sample).
        target: unlabelled target images for ``knn`` (None: the pool rule alone);
            ``target_name`` (``train``, ``test``) names them in the rule.
        nn: precomputed :func:`neighbours` of ``target``.

    Returns:
        a :class:`Choice`: rule ``pool+knn-<target_name>``, ``pool``, ``knn-<target_name>``
        (no pool image to score), or ``fallback``.
    """
    p_scores, n_p = pool_alpha_scores(text_weights, sums, counts, *held, grid=grid)
    k_scores, n_k = (np.full(len(grid), np.nan), 0)
    if target is not None and len(target) >= 2:
        k_scores, n_k = knn_alpha_scores(text_weights, sums, target, nn, grid, knn_cfg)
    picks = []
    if n_p:
        picks.append(("pool", pick(p_scores, grid), p_scores))
    if n_k:
        picks.append((f"knn-{target_name}", pick(k_scores, grid), k_scores))
    if not picks:
        return Choice(float(fallback), "fallback", float("nan"), 0)
    if len(picks) == 1:
        name, i, scores = picks[0]
        return Choice(float(grid[i]), name, float(scores[i]), n_p or n_k)
    i = max(picks[0][1], picks[1][1])  # the larger alpha: grid is ascending
    return Choice(float(grid[i]), f"pool+knn-{target_name}", float(p_scores[i]), n_p + n_k)
