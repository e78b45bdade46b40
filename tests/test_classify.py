"""Issue 7: the priming classifier against direct numpy implementations of its formulas."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate import classify as C


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_weights(T, F, y, alpha):
    """Direct implementation of W = alpha T + (1 - alpha) M (DESIGN.md), empty class -> T."""
    M = np.array(T, dtype=np.float64)
    for c in range(T.shape[0]):
        rows = F[y == c]
        if len(rows):
            s = unit(rows).sum(0)
            M[c] = s / np.linalg.norm(s)
    return alpha * T + (1 - alpha) * M


def clusters(seed=0, classes=10, d=32, n_priming=600, text_noise=5.2):
    """Clean class clusters and a noisy text head: priming must help."""
    rng = np.random.default_rng(seed)
    centers = unit(rng.standard_normal((classes, d)))
    text = unit(centers + text_noise * rng.standard_normal((classes, d)) / np.sqrt(d))

    def draw(n):
        y = rng.integers(0, classes, n)
        f = unit(centers[y] + 2.7 * rng.standard_normal((n, d)) / np.sqrt(d))
        return f.astype(np.float32), y

    return text.astype(np.float32), draw(200), draw(1000), draw(n_priming)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 1.0])
def test_priming_weights_and_predictions_match_formula_with_empty_class(alpha):
    rng = np.random.default_rng(0)
    T = unit(rng.standard_normal((4, 8)))
    F16 = unit(rng.standard_normal((10, 8))).astype(np.float16)  # float16, as stored
    y = np.array([0, 0, 1, 1, 1, 3, 3, 0, 1, 3])  # class 2 has no features
    W = C.priming_weights(T.astype(np.float16), F16, y, alpha)
    want = reference_weights(
        T.astype(np.float16).astype(np.float64), F16.astype(np.float64), y, alpha
    )
    assert W.dtype == np.float32 and W.shape == (4, 8) and np.isfinite(W).all()
    np.testing.assert_allclose(W, want, atol=1e-5)
    np.testing.assert_allclose(W[2], T[2], atol=1e-3)  # empty class: its text row, any alpha
    if alpha == 1.0:
        np.testing.assert_allclose(W, T, atol=1e-3)
    Q = unit(rng.standard_normal((50, 8)))
    assert (
        C.predict(Q.astype(np.float16), W)
        == np.argmax(Q.astype(np.float16).astype(np.float64) @ want.T, axis=1)
    ).all()
    assert C.accuracy(Q, np.argmax(Q @ want.T, axis=1), W) == 1.0


def test_priming_weights_without_features_is_the_text_head():
    T = unit(np.random.default_rng(1).standard_normal((3, 5)))
    np.testing.assert_allclose(C.priming_weights(T, np.zeros((0, 5)), [], 0.2), T, atol=1e-6)


def test_priming_weights_validate():
    T = np.eye(3)
    with pytest.raises(ValueError, match="alpha"):
        C.priming_weights(T, np.eye(3), [0, 1, 2], 1.5)
    with pytest.raises(ValueError, match="labels"):
        C.priming_weights(T, np.eye(3), [0, 1, 3], 0.5)
    with pytest.raises(ValueError, match="labels"):
        C.priming_weights(T, np.eye(3), [0, 1], 0.5)


def test_class_sums_match_add_at_across_blocks(monkeypatch):
    rng = np.random.default_rng(2)
    F = unit(rng.standard_normal((1000, 16))).astype(np.float16)
    y = rng.integers(0, 7, 1000)
    want = np.zeros((9, 16))
    np.add.at(want, y, unit(F.astype(np.float64)))
    monkeypatch.setattr(C, "_BLOCK_ELEMENTS", 16 * 37)  # 37 rows per block
    np.testing.assert_allclose(C.class_sums(F, y, 9), want, atol=1e-4)


def test_shots_seeded_reproducible_per_class_and_disjoint_from_test():
    rng = np.random.default_rng(3)
    uids = np.array([f"u{i:04d}" for i in range(300)])
    labels = rng.integers(0, 6, 300)
    labels[labels == 5] = 4  # class 5 has no images
    labels[np.flatnonzero(labels == 3)[2:]] = 0  # class 3 has only 2
    test = rng.permutation(300)[:100]
    train = np.setdiff1d(np.arange(300), test)
    a = C.sample_shots(labels[train], 4, seed=1, num_classes=6)
    assert (a == C.sample_shots(labels[train], 4, seed=1, num_classes=6)).all()
    assert not np.array_equal(a, C.sample_shots(labels[train], 4, seed=2, num_classes=6))
    counts = np.bincount(labels[train][a], minlength=6)
    assert counts[5] == 0 and counts[3] == min(4, int((labels[train] == 3).sum()))
    assert (counts[[0, 1, 2, 4]] == 4).all()
    # Indices refer to the train split only: none of the drawn images is a test image.
    assert not set(uids[train][a]) & set(uids[test])
    assert len(C.sample_shots(labels[train], 1000, 0, 6)) == len(train)  # small classes: all
    assert len(C.sample_shots(labels[train], 0, 0, 6)) == 0


def test_shot_folds_rank_within_class():
    assert C.shot_folds(np.array([2, 0, 2, 0, 1, 2])).tolist() == [0, 0, 1, 1, 0, 2]


def _brute_scores(T, held_f, held_y, head_f, head_y, grid, remove):
    """Accuracy per alpha, refitting priming_weights without each example's ``remove`` set."""
    correct = np.zeros(len(grid))
    for i in range(len(held_y)):
        keep = ~remove(i)
        for j, a in enumerate(grid):
            W = C.priming_weights(T, head_f[keep], head_y[keep], a)
            correct[j] += np.argmax(held_f[i] @ W.T) == held_y[i]
    return correct / len(held_y)


def test_leave_one_out_over_priming_matches_refitting():
    T, _, _, (pf, py) = clusters(4, classes=5, d=16, n_priming=40)
    grid = np.array([0.0, 0.3, 0.6, 1.0])
    sums, counts = C.class_sums(pf, py, 5), np.bincount(py, minlength=5)
    held = np.arange(0, 40, 3)
    scores, n = C.loo_alpha_scores(T, pf[held], py[held], sums, counts, grid)
    want = _brute_scores(T, pf[held], py[held], pf, py, grid, lambda i: np.arange(40) == held[i])
    assert n == len(held)
    np.testing.assert_allclose(scores, want)


def test_cross_validation_over_shots_matches_refitting():
    T, (tf, ty), _, (pf, py) = clusters(5, classes=4, d=16, n_priming=30)
    idx = C.sample_shots(ty, 3, 0, 4)
    sf, sy = tf[idx], ty[idx]
    grid = np.array([0.0, 0.5, 1.0])
    folds = C.shot_folds(sy)
    head_f, head_y = np.concatenate([sf, pf]), np.concatenate([sy, py])
    scores, n = C.cv_alpha_scores(T, sf, sy, C.class_sums(pf, py, 4), grid)
    fold_of = np.r_[folds, np.full(len(py), -1)]
    want = _brute_scores(T, sf, sy, head_f, head_y, grid, lambda i: fold_of == folds[i])
    assert n == len(sy)
    np.testing.assert_allclose(scores, want)


def test_priming_beats_zero_shot_and_auto_alpha_is_near_best():
    T, _, (xf, xy), (pf, py) = clusters(0)
    zs = C.accuracy(xf, xy, T)
    accs = {float(a): C.accuracy(xf, xy, C.priming_weights(T, pf, py, a)) for a in C.ALPHA_GRID}
    best = max(accs.values())
    assert best > zs + 0.2
    auto = C.choose_alpha(T, pf[:0], py[:0], pf, py)
    assert auto.rule == "loo-priming" and auto.n_held == len(py)
    assert accs[auto.value] >= best - 0.02


def test_auto_alpha_with_shots_and_its_fallbacks():
    T, (tf, ty), (xf, xy), (pf, py) = clusters(6)
    idx = C.sample_shots(ty, 5, 0, 10)
    accs = {
        float(a): C.accuracy(xf, xy, C.priming_weights(T, tf[idx], ty[idx], a))
        for a in C.ALPHA_GRID
    }
    auto = C.choose_alpha(T, tf[idx], ty[idx], pf[:0], py[:0])
    assert auto.rule == "cv-shots" and accs[auto.value] >= max(accs.values()) - 0.05
    one = C.sample_shots(ty, 1, 0, 10)
    assert C.choose_alpha(T, tf[one], ty[one], pf[:0], py[:0], fallback=0.55).value == 0.55
    assert C.choose_alpha(T, tf[one], ty[one], pf, py).rule == "cv-shots"  # priming keeps classes
    assert C.choose_alpha(T, tf[:0], ty[:0], pf[:0], py[:0]).value == 1.0


def test_tip_adapter_logits_and_affinity_match_the_formula():
    T, (tf, ty), (xf, _), (pf, py) = clusters(7, n_priming=300)
    a, b = 2.0, 5.5
    onehot = np.eye(10)[py]
    want = 100 * xf[:20] @ T.T + a * np.exp(-b * (1 - xf[:20] @ pf.T)) @ onehot
    np.testing.assert_allclose(C.tip_logits(xf[:20], T, pf, py, a, b), want, rtol=1e-4, atol=1e-3)
    aff = C.class_affinity(xf[:20], pf, py, 10, (1.0, b), batch=7)
    np.testing.assert_allclose(
        aff[1], np.exp(-b * (1 - xf[:20] @ pf.T)) @ onehot, rtol=1e-4, atol=1e-5
    )
    # Held-out part: each shot's fold-mates' share of the cache term, computed directly.
    idx = C.sample_shots(ty, 3, 0, 10)
    sf, sy = tf[idx], ty[idx]
    folds = C.shot_folds(sy)
    rem, counts = C.held_out_affinity(sf, sy, folds, 10, (b,))
    same = folds[:, None] == folds[None, :]
    np.testing.assert_allclose(
        rem[0], (np.exp(-b * (1 - sf @ sf.T)) * same) @ np.eye(10)[sy], rtol=1e-4, atol=1e-5
    )
    assert (counts.sum(1) == np.bincount(folds)[folds]).all()
    rem, counts = C.held_out_affinity(sf, sy, folds, 10)
    val = C.class_affinity(sf, sf, sy, 10)
    ch = C.search_tip(T, sf, sy, val, rem, np.bincount(sy, minlength=10), counts)
    assert ch.rule == "cv-shots" and ch.value[0] in C.TIP_A_GRID and ch.value[1] in C.TIP_B_GRID
    one = C.sample_shots(ty, 1, 0, 10)
    r1, c1 = C.held_out_affinity(tf[one], ty[one], C.shot_folds(ty[one]), 10)
    fb = C.search_tip(
        T,
        tf[one],
        ty[one],
        C.class_affinity(tf[one], tf[one], ty[one], 10),
        r1,
        np.bincount(ty[one], minlength=10),
        c1,
    )
    assert fb.rule == "fallback" and fb.value == C.TIP_DEFAULT
