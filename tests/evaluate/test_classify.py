"""The priming classifier, its alpha rules and Tip-Adapter against direct numpy implementations."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate import alpha as A
from pipeline.evaluate import classify as C
from pipeline.evaluate import tip as TIP


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
    scores, n = A.loo_alpha_scores(T, pf[held], py[held], sums, counts, grid)
    want = _brute_scores(T, pf[held], py[held], pf, py, grid, lambda i: np.arange(40) == held[i])
    assert n == len(held)
    np.testing.assert_allclose(scores, want)


def test_pool_rule_scores_dropped_images_against_the_head_and_kept_ones_without_themselves():
    T, _, _, (pf, py) = clusters(8, classes=5, d=16, n_priming=60)
    grid = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    in_head = np.random.default_rng(0).random(60) < 0.6  # the filter's kept images
    head_f, head_y = pf[in_head], py[in_head]
    sums, counts = C.class_sums(head_f, head_y, 5), np.bincount(head_y, minlength=5)
    scores, n = A.pool_alpha_scores(T, sums, counts, pf, py, in_head, grid)
    head_rows = np.flatnonzero(in_head)
    want = _brute_scores(
        T,
        pf,
        py,
        head_f,
        head_y,
        grid,
        lambda i: head_rows == i,  # only itself, if kept
    )
    assert n == 60
    np.testing.assert_allclose(scores, want)


def test_cross_validation_over_shots_matches_refitting():
    T, (tf, ty), _, (pf, py) = clusters(5, classes=4, d=16, n_priming=30)
    idx = C.sample_shots(ty, 3, 0, 4)
    sf, sy = tf[idx], ty[idx]
    grid = np.array([0.0, 0.5, 1.0])
    folds = C.shot_folds(sy)
    head_f, head_y = np.concatenate([sf, pf]), np.concatenate([sy, py])
    scores, n = A.cv_alpha_scores(T, sf, sy, C.class_sums(pf, py, 4), grid)
    fold_of = np.r_[folds, np.full(len(py), -1)]
    want = _brute_scores(T, sf, sy, head_f, head_y, grid, lambda i: fold_of == folds[i])
    assert n == len(sy)
    np.testing.assert_allclose(scores, want)


def test_knn_rule_matches_a_direct_kappa_of_neighbour_agreement():
    T, (tf, _), (xf, _), (pf, py) = clusters(9, classes=6, d=16, n_priming=120)
    grid = np.array([0.0, 0.4, 0.8, 1.0])
    sums = C.class_sums(pf, py, 6)
    scores, n = A.knn_alpha_scores(T, sums, xf[:300], grid=grid)
    x = xf[:300].astype(np.float64)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.argsort(-sim, axis=1, kind="stable")[:, : A.KNN_K]
    want = []
    for a in grid:
        pred = np.argmax(x @ C.priming_weights(T, pf, py, a).T, axis=1)
        agree = np.mean(pred[nn] == pred[:, None])
        chance = np.sum((np.bincount(pred, minlength=6) / 300) ** 2)
        want.append((agree - chance) / (1 - chance))
    assert n == 300
    np.testing.assert_allclose(scores, want, atol=1e-6)


def test_priming_beats_zero_shot_and_the_pool_rule_is_near_best_on_an_unfiltered_pool():
    T, _, (xf, xy), (pf, py) = clusters(0)
    zs = C.accuracy(xf, xy, T)
    accs = {float(a): C.accuracy(xf, xy, C.priming_weights(T, pf, py, a)) for a in A.ALPHA_GRID}
    best = max(accs.values())
    assert best > zs + 0.2
    sums, counts = C.class_sums(pf, py, 10), np.bincount(py, minlength=10)
    held = (pf, py, np.ones(len(py), bool))
    auto = A.choose_alpha_priming(T, sums, counts, held)
    assert auto.rule == "pool" and auto.n_held == len(py)
    assert accs[auto.value] >= best - 0.02
    both = A.choose_alpha_priming(T, sums, counts, held, xf, "test")
    knn = A.pick(A.knn_alpha_scores(T, sums, xf)[0])
    assert both.rule == "pool+knn-test"
    assert both.value == max(auto.value, A.ALPHA_GRID[knn])  # the larger of the two


def test_auto_alpha_with_shots_and_its_fallbacks():
    T, (tf, ty), (xf, xy), (pf, py) = clusters(6)
    idx = C.sample_shots(ty, 5, 0, 10)
    accs = {
        float(a): C.accuracy(xf, xy, C.priming_weights(T, tf[idx], ty[idx], a))
        for a in A.ALPHA_GRID
    }
    auto = A.choose_alpha_shots(T, tf[idx], ty[idx])
    assert auto.rule == "cv-shots" and accs[auto.value] >= max(accs.values()) - 0.05
    one = C.sample_shots(ty, 1, 0, 10)
    assert A.choose_alpha_shots(T, tf[one], ty[one], fallback=0.55).value == 0.55
    p_sums = C.class_sums(pf, py, 10)
    assert A.choose_alpha_shots(T, tf[one], ty[one], p_sums).rule == "cv-shots"
    empty = (pf[:0], py[:0], np.zeros(0, bool))
    assert A.choose_alpha_priming(T, p_sums, np.zeros(10), empty, fallback=0.4).value == 0.4


def test_tip_adapter_logits_and_affinity_match_the_formula():
    T, (tf, ty), (xf, _), (pf, py) = clusters(7, n_priming=300)
    a, b = 2.0, 5.5
    onehot = np.eye(10)[py]
    cache = np.exp(-b * (1 - xf[:20] @ pf.T)) @ onehot
    want = 100 * xf[:20] @ T.T + a * cache
    got = TIP.tip_logits(xf[:20], T, pf, py, a, b, balanced=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    # Balanced: the per-class mean of the same terms, on the scale of 16 keys per class.
    mean = cache / onehot.sum(0) * TIP.TIP_KEYS_SCALE
    got = TIP.tip_logits(xf[:20], T, pf, py, a, b)
    np.testing.assert_allclose(got, 100 * xf[:20] @ T.T + a * mean, rtol=1e-4, atol=1e-3)
    aff = TIP.class_affinity(xf[:20], pf, py, 10, (1.0, b), batch=7)
    np.testing.assert_allclose(aff[1], cache, rtol=1e-4, atol=1e-5)
    # Held-out part: each shot's fold-mates' share of the cache term, computed directly.
    idx = C.sample_shots(ty, 3, 0, 10)
    sf, sy = tf[idx], ty[idx]
    folds = C.shot_folds(sy)
    rem, counts = TIP.held_out_affinity(sf, sy, folds, 10, (b,))
    same = folds[:, None] == folds[None, :]
    np.testing.assert_allclose(
        rem[0], (np.exp(-b * (1 - sf @ sf.T)) * same) @ np.eye(10)[sy], rtol=1e-4, atol=1e-5
    )
    assert (counts.sum(1) == np.bincount(folds)[folds]).all()
    rem, counts = TIP.held_out_affinity(sf, sy, folds, 10)
    val = TIP.class_affinity(sf, sf, sy, 10)
    ch = TIP.search_tip(T, sf, sy, val, np.bincount(sy, minlength=10), rem, counts)
    assert ch.rule == "cv-shots" and ch.value[0] in TIP.TIP_A_GRID and ch.value[1] in TIP.TIP_B_GRID
    one = C.sample_shots(ty, 1, 0, 10)
    r1, c1 = TIP.held_out_affinity(tf[one], ty[one], C.shot_folds(ty[one]), 10)
    v1 = TIP.class_affinity(tf[one], tf[one], ty[one], 10)
    fb = TIP.search_tip(T, tf[one], ty[one], v1, np.bincount(ty[one], minlength=10), r1, c1)
    assert fb.rule == "fallback" and fb.value == TIP.TIP_DEFAULT
    # A held-out example that is not a key (group -1) removes nothing.
    r2, c2 = TIP.held_out_affinity(sf, sy, np.full(len(sy), -1), 10, (b,))
    assert not r2.any() and not c2.any()


def test_tip_adapter_balanced_cache_keeps_small_classes_at_100_to_1():
    """Five classes with 1000 priming images each, five with 10: the summed cache votes for the
    large classes; the balanced one keeps the small classes' accuracy near the centroid head's."""
    rng = np.random.default_rng(12)
    c, d = 10, 32
    centers = unit(rng.standard_normal((c, d)))
    text = unit(centers + 1.3 * rng.standard_normal((c, d)) / np.sqrt(d)).astype(np.float32)
    sizes = np.array([1000] * 5 + [10] * 5)
    py = np.repeat(np.arange(c), sizes)
    pf = unit(centers[py] + 1.6 * rng.standard_normal((len(py), d)) / np.sqrt(d)).astype(np.float32)
    xy = np.repeat(np.arange(c), 200)
    xf = unit(centers[xy] + 1.6 * rng.standard_normal((len(xy), d)) / np.sqrt(d)).astype(np.float32)
    small = xy >= 5

    sums, counts = C.class_sums(pf, py, c), np.bincount(py, minlength=c)
    alpha = A.choose_alpha_priming(text, sums, counts, (pf, py, np.ones(len(py), bool))).value
    centroid = C.predict(xf, C.weights_from_sums(text, sums, alpha))
    centroid_small = np.mean(centroid[small] == xy[small])

    held = np.sort(rng.choice(len(py), 1500, replace=False))
    val = TIP.class_affinity(pf[held], pf, py, c)
    rem, rem_counts = TIP.held_out_affinity(pf[held], py[held], np.arange(len(held)), c)
    ch = TIP.search_tip(text, pf[held], py[held], val, counts, rem, rem_counts, rule="pool")
    tip = np.argmax(TIP.tip_logits(xf, text, pf, py, *ch.value), axis=1)
    assert np.mean(tip[small] == xy[small]) >= centroid_small - 0.05
    assert centroid_small > 0.6  # the small classes are learnable
    # Tip-Adapter's sum at the same (a, b): most predictions go to the large classes.
    summed = np.argmax(TIP.tip_logits(xf, text, pf, py, *ch.value, balanced=False), axis=1)
    assert np.mean(summed[small] == xy[small]) < centroid_small - 0.2
    assert np.mean(summed >= 5) < 0.25
