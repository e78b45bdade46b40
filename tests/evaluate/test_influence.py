"""The closed-form leave-out effects of priming images against brute force: the centroid head
refit from scratch without each image, each caption term, each class."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate import classify as C
from pipeline.evaluate import influence as I


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _world(seed, c=5, d=16, n_priming=60, n_labelled=80, noise=1.0, spread=0.0):
    """Class directions, text rows near them, priming images (some mislabelled) and a
    labelled set, all float64 unit vectors."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(c, d)))
    text = _unit(centres + 0.8 * rng.normal(size=(c, d)))
    p_y = rng.integers(0, c, n_priming)
    true = np.where(rng.random(n_priming) < 0.25, rng.integers(0, c, n_priming), p_y)
    p_f = _unit(centres[true] + noise * rng.normal(size=(n_priming, d)) + spread)
    l_y = rng.integers(0, c, n_labelled)
    l_f = _unit(centres[l_y] + noise * rng.normal(size=(n_labelled, d)))
    return text, p_f, p_y, l_f, l_y


def _brute(text, p_f, p_y, keep, alpha, l_f, l_y):
    """Refit the head from the kept priming images alone: (labelled right, summed margin)."""
    c = text.shape[0]
    sums = np.zeros_like(text)
    np.add.at(sums, p_y[keep], p_f[keep])
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    m = np.where(norms > 1e-6, sums / np.where(norms > 0, norms, 1), text)
    scores = l_f @ (alpha * text + (1 - alpha) * m).T
    rows = np.arange(len(l_y))
    own = scores[rows, l_y]
    right = int((np.argmax(scores, axis=1) == l_y).sum())
    rivals = scores.copy()
    rivals[rows, l_y] = -np.inf
    assert c > 1
    return right, float((own - rivals.max(axis=1)).sum())


def _check(effects, text, p_f, p_y, groups, alpha, l_f, l_y):
    for g in range(effects.correct.shape[0]):
        right, margin = _brute(text, p_f, p_y, groups != g, alpha, l_f, l_y)
        assert effects.correct[g] == right, g
        assert effects.margin[g] == pytest.approx(margin, rel=1e-9, abs=1e-9), g


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("alpha", [0.0, 0.35, 0.8])
def test_removing_each_image_matches_a_refit(seed, alpha):
    text, p_f, p_y, l_f, l_y = _world(seed)
    head = I.score(text, I_sums(p_f, p_y, 5), alpha, l_f, l_y)
    groups = np.arange(len(p_y))
    effects = I.group_effects(head, p_f, p_y, groups, len(p_y))
    _check(effects, text, p_f, p_y, groups, alpha, l_f, l_y)
    full_right, full_margin = _brute(text, p_f, p_y, np.ones(len(p_y), bool), alpha, l_f, l_y)
    assert effects.base_correct == full_right
    assert effects.base_margin == pytest.approx(full_margin, rel=1e-9)
    # Some removals change the count both ways, or the test would prove little.
    assert (effects.influence > 0).any() or (effects.influence < 0).any()


def I_sums(p_f, p_y, c):
    sums = np.zeros((c, p_f.shape[1]))
    np.add.at(sums, p_y, p_f)
    return sums


@pytest.mark.parametrize("seed", range(4))
def test_removing_a_class_or_a_term_matches_a_refit(seed):
    """Whole classes (the class row falls back to text) and caption terms, including a term
    shared by two classes and an image kept under two labels (rescored directly)."""
    c = 5
    text, p_f, p_y, l_f, l_y = _world(seed, c=c)
    head = I.score(text, I_sums(p_f, p_y, c), 0.4, l_f, l_y)
    by_class = I.group_effects(head, p_f, p_y, p_y, c)
    _check(by_class, text, p_f, p_y, p_y, 0.4, l_f, l_y)
    rng = np.random.default_rng(seed)
    terms = p_y * 2 + rng.integers(0, 2, len(p_y))  # two terms per class ...
    terms[(p_y == 0) | (p_y == 1)] = 99  # ... and one shared by classes 0 and 1
    codes, terms = np.unique(terms, return_inverse=True)
    by_term = I.group_effects(head, p_f, p_y, terms, len(codes))
    _check(by_term, text, p_f, p_y, terms, 0.4, l_f, l_y)
    # An image under two labels: its uid groups a row of each class.
    p_f2 = np.concatenate([p_f, p_f[:1]])
    p_y2 = np.concatenate([p_y, [(p_y[0] + 1) % c]])
    uid = np.concatenate([np.arange(len(p_y)), [0]])
    head2 = I.score(text, I_sums(p_f2, p_y2, c), 0.4, l_f, l_y)
    by_uid = I.group_effects(head2, p_f2, p_y2, uid, len(p_y))
    _check(by_uid, text, p_f2, p_y2, uid, 0.4, l_f, l_y)


def test_emptying_a_class_and_lonely_images():
    """A class whose only image is removed takes its text row; a class with no priming
    image at all keeps it; one labelled class only (no rival of the second rank)."""
    text, p_f, p_y, l_f, l_y = _world(7, c=4, n_priming=12)
    p_y = np.array([0] * 6 + [1] * 5 + [2])  # class 2 has one image, class 3 none
    head = I.score(text, I_sums(p_f, p_y, 4), 0.5, l_f, l_y % 4)
    groups = np.arange(len(p_y))
    effects = I.group_effects(head, p_f, p_y, groups, len(p_y))
    _check(effects, text, p_f, p_y, groups, 0.5, l_f, l_y % 4)
    two = _unit(text[:2])
    head = I.score(two, I_sums(p_f[:11], p_y[:11], 2), 0.3, l_f[:10], np.zeros(10, int))
    effects = I.group_effects(head, p_f[:11], p_y[:11], groups[:11], 11)
    _check(effects, two, p_f[:11], p_y[:11], groups[:11], 0.3, l_f[:10], np.zeros(10, int))


def test_ties_break_as_argmax_does():
    """Identical text rows make exact ties; argmax takes the lower class, so must the closed
    form."""
    text, p_f, p_y, l_f, l_y = _world(3, c=4)
    text[3] = text[2]
    p_y = np.where(p_y == 3, 2, p_y)  # class 3: text only, a copy of class 2's text row
    for alpha in (1.0, 0.6):
        head = I.score(text, I_sums(p_f, p_y, 4), alpha, l_f, l_y)
        groups = np.arange(len(p_y))
        _check(
            I.group_effects(head, p_f, p_y, groups, len(p_y)),
            text,
            p_f,
            p_y,
            groups,
            alpha,
            l_f,
            l_y,
        )


def test_the_full_head_is_the_evaluations():
    """On well-separated data the float64 head predicts as classify's float32 ensemble does."""
    text, p_f, p_y, l_f, l_y = _world(11, c=6, noise=0.3)
    for alpha in (0.0, 0.5, 1.0):
        head = I.score(text, I_sums(p_f, p_y, 6), alpha, l_f, l_y)
        w = C.priming_weights(text.astype(np.float32), p_f.astype(np.float16), p_y, alpha)
        want = C.accuracy(l_f.astype(np.float32), l_y, w)
        assert head.correct.mean() == pytest.approx(want)


def test_blocks_give_the_same_answer(monkeypatch):
    text, p_f, p_y, l_f, l_y = _world(5, n_priming=200)
    head = I.score(text, I_sums(p_f, p_y, 5), 0.3, l_f, l_y)
    whole = I.group_effects(head, p_f, p_y, np.arange(200), 200)
    monkeypatch.setattr(I, "_BLOCK_ELEMENTS", 7 * len(l_y))  # 7 removals per block
    blocked = I.group_effects(head, p_f, p_y, np.arange(200), 200)
    assert np.array_equal(whole.correct, blocked.correct)
    assert np.allclose(whole.margin, blocked.margin, rtol=0, atol=1e-9)


def test_best_alpha_looks_at_the_labelled_set_only():
    text, p_f, p_y, l_f, l_y = _world(2)
    sums = I_sums(p_f, p_y, 5)
    alpha, acc = I.best_alpha(text, sums, l_f, l_y)
    accs = {a: np.mean(I.score(text, sums, a, l_f, l_y).correct) for a in I.ALPHA_GRID.tolist()}
    assert acc == pytest.approx(max(accs.values()))
    assert alpha == max(a for a, v in accs.items() if v == max(accs.values()))
    assert I.best_alpha(text, sums, l_f[:0], l_y[:0])[0] == 1.0


def test_bad_input_is_refused():
    text, p_f, p_y, l_f, l_y = _world(0)
    with pytest.raises(ValueError, match="alpha"):
        I.score(text, I_sums(p_f, p_y, 5), 1.5, l_f, l_y)
    with pytest.raises(ValueError, match="labels"):
        I.score(text, I_sums(p_f, p_y, 5), 0.5, l_f, l_y + 5)
    head = I.score(text, I_sums(p_f, p_y, 5), 0.5, l_f, l_y)
    with pytest.raises(ValueError, match="groups"):
        I.group_effects(head, p_f, p_y, np.arange(3), 3)
