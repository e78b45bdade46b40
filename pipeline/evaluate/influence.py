"""Exact leave-out effects of priming images on the training-free centroid head.

The head is W = alpha T + (1 - alpha) M with M_c = norm(S_c), S_c the sum of class c's unit
priming features (T_c where S_c is zero; :mod:`pipeline.evaluate.classify`). Taking a set of
images out of class k changes only S_k, so over a labelled set X only column k of the scores
X W^T changes, to alpha X T_k + (1 - alpha) X (S_k - u) / |S_k - u| with u the set's feature
sum: the dot products X S_k and X u and the norm |S_k - u|^2 = |S_k|^2 - 2 S_k.u + |u|^2 give
every removal's new column at once, and the best rival column of each example (its top two
rivals, precomputed) says whether its prediction changes. A set spanning several classes (a
caption term shared by two classes, an image kept under two labels) is rescored directly.

As in Jain et al., "A Data-Based Perspective on Transfer Learning" (CVPR 2023), the effect of
a source group is the change in target accuracy when it is removed; here it is computed
exactly for a fixed alpha rather than estimated from models trained on random subsets.
Everything is float64, so a brute-force refit gives the same counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Below this norm a class's sum counts as empty and its image row falls back to text, as in
# pipeline.evaluate.classify.weights_from_sums.
EMPTY_NORM = 1e-6
# Labelled examples x removals per block of the dense products (32 MiB of float64).
_BLOCK_ELEMENTS = 1 << 22


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_sums(feats: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, D]`` float64 sums of the unit features of each class (zeros for none)."""
    f = _unit(feats)
    y = np.asarray(labels, np.int64).reshape(-1)
    out = np.zeros((num_classes, f.shape[1] if f.ndim == 2 else 0), np.float64)
    if len(y):
        order = np.argsort(y, kind="stable")
        ys = y[order]
        starts = np.flatnonzero(np.r_[True, ys[1:] != ys[:-1]])
        out[ys[starts]] = np.add.reduceat(f[order], starts, axis=0)  # np.add.at is slow
    return out


@dataclass(frozen=True)
class Scored:
    """A centroid head over a labelled set, with what each removal needs.

    ``xt`` and ``xs`` are X T^T and X S^T ``[N, C]``; ``scores`` X W^T; ``own`` each example's
    score of its true class; ``r1``/``r2`` (values) and ``i1``/``i2`` (classes) its best and
    second-best rival classes (-inf, class C where there is none).
    """

    text: np.ndarray
    sums: np.ndarray
    alpha: float
    feats: np.ndarray
    labels: np.ndarray
    xt: np.ndarray
    xs: np.ndarray
    scores: np.ndarray
    own: np.ndarray
    r1: np.ndarray
    i1: np.ndarray
    r2: np.ndarray
    i2: np.ndarray

    @property
    def correct(self) -> np.ndarray:
        """Whether each labelled example is classified right (ties go to the lower class, as
        ``np.argmax`` breaks them)."""
        return _beats(self.own, self.labels, self.r1, self.i1)

    @property
    def margin(self) -> np.ndarray:
        """Own score minus the best rival's (positive: right)."""
        return self.own - self.r1


def _beats(a: np.ndarray, ia: np.ndarray, b: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Whether class ``ia`` with score ``a`` wins over class ``ib`` with ``b`` under argmax."""
    return (a > b) | ((a == b) & (ia < ib))


def image_rows(text: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """M: normalised class sums, the text row where a class's sum is empty (float64)."""
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.where(norms > EMPTY_NORM, sums / np.maximum(norms, 1e-300), text)


def score(
    text: np.ndarray, sums: np.ndarray, alpha: float, feats: np.ndarray, labels: np.ndarray
) -> Scored:
    """The head ``alpha T + (1 - alpha) norm(sums)`` over the labelled ``feats``/``labels``.

    Args:
        text: T ``[C, D]``, one unit row per class.
        sums: ``[C, D]`` sums of the unit priming features per class (zeros for none).
        alpha: weight of the text head, in [0, 1].
        feats: ``[N, D]`` labelled features (normalised here); labels ``[N]`` in [0, C).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    t = np.asarray(text, np.float64)
    s = np.asarray(sums, np.float64)
    x = _unit(feats)
    y = np.asarray(labels, np.int64).reshape(-1)
    c = t.shape[0]
    if len(y) and (y.min() < 0 or y.max() >= c):
        raise ValueError(f"labels must be in [0, {c})")
    xt, xs = x @ t.T, x @ s.T
    m = image_rows(t, s)
    scores = alpha * xt + (1.0 - alpha) * (x @ m.T)
    rows = np.arange(len(y))
    own = scores[rows, y]
    rivals = scores.copy()
    rivals[rows, y] = -np.inf
    pad = np.full((len(y), 2), -np.inf)
    rivals = np.concatenate([rivals, pad], axis=1)  # two rivals always exist (class C: none)
    top = np.argsort(-rivals, axis=1, kind="stable")[:, :2]
    top = np.where(rivals[rows[:, None], top] == -np.inf, c, top)
    r = np.take_along_axis(rivals, np.minimum(top, c), axis=1)
    return Scored(
        t, s, float(alpha), x, y, xt, xs, scores, own, r[:, 0], top[:, 0], r[:, 1], top[:, 1]
    )


def remove_within_class(
    head: Scored, removed: np.ndarray, classes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact effect of taking each of G feature sums out of one class, one at a time.

    Args:
        head: the full head (:func:`score`).
        removed: ``[G, D]`` the sums of the unit features each removal takes out.
        classes: ``[G]`` the class each removal takes them from.

    Returns:
        ``(correct, margin)``, each ``[G]``: labelled examples right, and the sum of their
        margins, with that removal applied.
    """
    u = np.asarray(removed, np.float64).reshape(len(classes), -1)
    k = np.asarray(classes, np.int64)
    n = len(head.labels)
    correct = np.zeros(len(k), np.int64)
    margin = np.zeros(len(k), np.float64)
    if n == 0:
        return correct, margin
    a = head.alpha
    y = head.labels[:, None]
    own, r1, i1, r2, i2 = (v[:, None] for v in (head.own, head.r1, head.i1, head.r2, head.i2))
    step = max(1, _BLOCK_ELEMENTS // n)
    for s in range(0, len(k), step):
        ub, kb = u[s : s + step], k[s : s + step]
        sk = head.sums[kb]
        norm2 = (sk * sk).sum(1) - 2 * (sk * ub).sum(1) + (ub * ub).sum(1)
        norm = np.sqrt(np.maximum(norm2, 0.0))
        xt_k = head.xt[:, kb]
        img = np.where(
            norm > EMPTY_NORM, (head.xs[:, kb] - head.feats @ ub.T) / np.maximum(norm, 1e-300), xt_k
        )
        new = a * xt_k + (1.0 - a) * img  # [N, G]: the new column k
        is_own = y == kb[None, :]
        # An example of class k: its own score changes, its rivals do not.
        own_margin = new - r1
        own_right = _beats(new, y, r1, i1)
        # Any other: its rivals are column k (new) and the best of the rest.
        other = np.where(i1 == kb[None, :], r2, r1)
        other_i = np.where(i1 == kb[None, :], i2, i1)
        rival = np.maximum(new, other)
        rest_right = _beats(own, y, new, kb[None, :]) & _beats(own, y, other, other_i)
        right = np.where(is_own, own_right, rest_right)
        correct[s : s + step] = right.sum(0)
        margin[s : s + step] = np.where(is_own, own_margin, own - rival).sum(0)
    return correct, margin


def remove_across_classes(
    head: Scored, removed: np.ndarray, classes: np.ndarray
) -> tuple[int, float]:
    """Exact effect of taking one set out of several classes at once: ``removed[j]`` (a feature
    sum) out of class ``classes[j]``. Rescores the changed columns; returns ``(correct,
    margin)`` as :func:`remove_within_class` does for one removal."""
    k = np.asarray(classes, np.int64)
    sums = head.sums.copy()
    np.add.at(sums, k, -np.asarray(removed, np.float64))
    cols = np.unique(k)
    m = image_rows(head.text[cols], sums[cols])
    scores = head.scores.copy()
    scores[:, cols] = head.alpha * head.xt[:, cols] + (1 - head.alpha) * (head.feats @ m.T)
    rows = np.arange(len(head.labels))
    own = scores[rows, head.labels]
    pred = np.argmax(scores, axis=1)
    scores[rows, head.labels] = -np.inf
    return int((pred == head.labels).sum()), float((own - scores.max(axis=1)).sum())


@dataclass(frozen=True)
class Effects:
    """Per group: labelled examples right and summed margin with the group removed, and the
    full head's (``base_correct``, ``base_margin``) over ``n`` labelled examples."""

    correct: np.ndarray
    margin: np.ndarray
    base_correct: int
    base_margin: float
    n: int

    @property
    def influence(self) -> np.ndarray:
        """Accuracy lost when the group is removed (positive: the group helps)."""
        return (self.base_correct - self.correct) / max(self.n, 1)

    @property
    def margin_influence(self) -> np.ndarray:
        """Mean margin lost when the group is removed (a finer signal for ties in accuracy)."""
        return (self.base_margin - self.margin) / max(self.n, 1)


def group_effects(
    head: Scored, feats: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_groups: int
) -> Effects:
    """The effect of removing each group of priming images from the head, exactly.

    Args:
        head: the head over the labelled set, built with every priming image (:func:`score`).
        feats, labels: the priming images (normalised here) and their classes.
        groups: ``[P]`` the group (0..n_groups-1) of each priming image: its uid, its caption
            term, its class.

    Returns:
        :class:`Effects` with one entry per group (a group without images changes nothing).
    """
    f = _unit(feats)
    y = np.asarray(labels, np.int64).reshape(-1)
    g = np.asarray(groups, np.int64).reshape(-1)
    c = head.text.shape[0]
    if len(g) != len(y) or len(f) != len(y):
        raise ValueError(f"{len(f)} features, {len(y)} labels, {len(g)} groups")
    base_correct = int(head.correct.sum())
    base_margin = float(head.margin.sum())
    correct = np.full(n_groups, base_correct, np.int64)
    margin = np.full(n_groups, base_margin, np.float64)
    if len(g) == 0:
        return Effects(correct, margin, base_correct, base_margin, len(head.labels))
    # One removal per (group, class) pair: the group's feature sum in that class.
    pair = g * c + y
    order = np.argsort(pair, kind="stable")
    sorted_pair = pair[order]
    starts = np.flatnonzero(np.r_[True, sorted_pair[1:] != sorted_pair[:-1]])
    pairs = sorted_pair[starts]
    sums = np.add.reduceat(f[order], starts, axis=0)  # np.add.at is slow on many rows
    p_group, p_class = pairs // c, pairs % c
    spans = np.bincount(p_group, minlength=n_groups)
    single = spans[p_group] == 1
    ok, mg = remove_within_class(head, sums[single], p_class[single])
    correct[p_group[single]] = ok
    margin[p_group[single]] = mg
    for grp in np.flatnonzero(spans > 1):
        sel = p_group == grp
        correct[grp], margin[grp] = remove_across_classes(head, sums[sel], p_class[sel])
    return Effects(correct, margin, base_correct, base_margin, len(head.labels))


ALPHA_GRID = np.round(np.linspace(0.0, 1.0, 21), 2)


def best_alpha(
    text: np.ndarray, sums: np.ndarray, feats: np.ndarray, labels: np.ndarray, grid=ALPHA_GRID
) -> tuple[float, float]:
    """The alpha of ``grid`` with the most labelled examples right, and that accuracy; among
    ties the largest (nearest zero-shot CLIP). Only the labelled set is looked at."""
    t = np.asarray(text, np.float64)
    x = _unit(feats)
    y = np.asarray(labels, np.int64).reshape(-1)
    if len(y) == 0:
        return 1.0, float("nan")
    txt, img = x @ t.T, x @ image_rows(t, np.asarray(sums, np.float64)).T
    accs = np.array([np.mean(np.argmax(a * txt + (1 - a) * img, axis=1) == y) for a in grid])
    best = np.flatnonzero(accs >= accs.max() - 1e-12)
    i = best[np.argmax(np.asarray(grid)[best])]
    return float(grid[i]), float(accs[i])
