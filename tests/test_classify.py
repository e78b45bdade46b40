"""Issue 7: the priming classifier against the formulas, shots, auto alpha, the table."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import classify as C
from pipeline.evaluate import EvaluateConfig, Task, evaluate_task, render_table


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_weights(T, F, y, alpha):
    """Direct implementation of W = alpha T + (1 - alpha) M (DESIGN.md)."""
    M = np.array(T, dtype=np.float64)
    for c in range(T.shape[0]):
        rows = F[y == c]
        if len(rows):
            s = unit(rows).sum(0)
            M[c] = s / np.linalg.norm(s)
    return alpha * T + (1 - alpha) * M


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 1.0])
def test_priming_weights_match_formula_with_empty_class(alpha):
    rng = np.random.default_rng(0)
    T = unit(rng.standard_normal((4, 8)))
    F = unit(rng.standard_normal((10, 8)))
    y = np.array([0, 0, 1, 1, 1, 3, 3, 0, 1, 3])  # class 2 has no features
    W = C.priming_weights(T, F.astype(np.float16), y, alpha)
    np.testing.assert_allclose(W, reference_weights(T, F.astype(np.float16).astype(np.float64), y, alpha), atol=2e-3)
    assert np.isfinite(W).all()
    np.testing.assert_allclose(W[2], T[2], atol=1e-6)  # empty class: its text row, any alpha
    if alpha == 1.0:
        np.testing.assert_allclose(W, T, atol=1e-6)
    Q = unit(rng.standard_normal((20, 8)))
    assert (C.predict(Q, W) == np.argmax(Q @ reference_weights(T, F.astype(np.float16).astype(np.float64), y, alpha).T, axis=1)).all()


def test_priming_weights_validate():
    T = np.eye(3)
    with pytest.raises(ValueError):
        C.priming_weights(T, np.eye(3), [0, 1, 2], 1.5)
    with pytest.raises(ValueError):
        C.priming_weights(T, np.eye(3), [0, 1, 3], 0.5)


def test_shots_seeded_reproducible_and_per_class():
    labels = np.repeat(np.arange(5), 7)
    labels[-3:] = 4
    a = C.sample_shots(labels, 3, seed=1, num_classes=6)
    assert (a == C.sample_shots(labels, 3, seed=1, num_classes=6)).all()
    assert not (a == C.sample_shots(labels, 3, seed=2, num_classes=6)).all()
    assert np.bincount(labels[a], minlength=6).tolist() == [3, 3, 3, 3, 3, 0]
    assert len(C.sample_shots(labels, 100, 0, 6)) == len(labels)  # small classes give all


def synthetic_task(seed=0, classes=10, d=32):
    """Clean class clusters, a noisy text head: priming must help."""
    rng = np.random.default_rng(seed)
    centers = unit(rng.standard_normal((classes, d)))
    text = unit(centers + 1.3 * rng.standard_normal((classes, d)) / np.sqrt(d) * 4)

    def draw(n):
        y = rng.integers(0, classes, n)
        return unit(centers[y] + 0.9 * rng.standard_normal((n, d)) / np.sqrt(d) * 3).astype(np.float32), y

    trf, try_ = draw(200)
    tef, tey = draw(1000)
    pf, py = draw(600)
    return Task(trf, try_, tef, tey, text.astype(np.float32), None, pf, py, classes)


def test_priming_beats_zero_shot_and_auto_alpha_is_near_best():
    task = synthetic_task()
    zs = C.accuracy(task.test_feats, task.test_labels, task.text)
    accs = {a: C.accuracy(task.test_feats, task.test_labels, C.priming_weights(task.text, task.priming_feats, task.priming_labels, a)) for a in C.ALPHA_GRID}
    auto = C.choose_alpha(task.text, np.zeros((0, 32)), np.zeros(0, int), task.priming_feats, task.priming_labels)
    best = max(accs.values())
    assert best > zs + 0.05
    assert accs[round(auto, 2)] >= best - 0.03
    recs = evaluate_task(task, EvaluateConfig(shots=(0, 2), seeds=2))
    by = {(r["method"], r["shots"], r["seed"]): r for r in recs}
    assert by[("priming", 0, 0)]["accuracy"] > by[("zero-shot CLIP", 0, 0)]["accuracy"]
    assert by[("few-shot + priming", 2, 1)]["n_shots"] == 20


def test_shots_come_from_train_and_results_reproducible():
    task = synthetic_task(1)
    a = evaluate_task(task, EvaluateConfig(shots=(1, 5), seeds=3))
    b = evaluate_task(task, EvaluateConfig(shots=(1, 5), seeds=3))
    assert a == b
    # Shots are drawn from the train split: changing test features cannot change which are drawn.
    idx = C.sample_shots(task.train_labels, 5, 0, task.num_classes)
    assert idx.max() < len(task.train_labels)


def test_tip_adapter_head_runs_and_uses_cache():
    task = synthetic_task(2)
    recs = evaluate_task(task, EvaluateConfig(shots=(0, 2), seeds=1, head="tip-adapter"))
    by = {(r["method"], r["shots"]): r["accuracy"] for r in recs}
    assert by[("priming", 0)] > by[("zero-shot CLIP", 0)]
    a, b = C.search_tip(task.text, task.priming_feats, task.priming_labels, task.train_feats, task.train_labels)
    logits = C.tip_logits(task.test_feats[:5], task.text, task.priming_feats, task.priming_labels, a, b)
    onehot = np.eye(task.num_classes)[task.priming_labels]
    want = 100 * task.test_feats[:5] @ task.text.T + a * np.exp(-b * (1 - task.test_feats[:5] @ task.priming_feats.T)) @ onehot
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-3)


def test_table_renders_mean_and_std():
    recs = [
        {"method": "zero-shot CLIP", "shots": 0, "seed": 0, "accuracy": 0.5, "alpha": 1.0},
        {"method": "few-shot", "shots": 1, "seed": 0, "accuracy": 0.6, "alpha": 0.5},
        {"method": "few-shot", "shots": 1, "seed": 1, "accuracy": 0.7, "alpha": 0.7},
    ]
    md = render_table(recs, "Cars", ["note"])
    assert "| zero-shot CLIP | 0 | 50.00 | 1.00 | 1 |" in md
    assert "| few-shot | 1 | 65.00 ± 5.00 | 0.60 | 2 |" in md and md.rstrip().endswith("note")


def test_evaluate_cli_end_to_end_and_leak_guard(tmp_path, capsys):
    from pipeline import embeddings as E
    from pipeline import io
    from pipeline.cli import main

    task = synthetic_task(3, classes=10)
    y = tmp_path / "ds.yaml"
    y.write_text("classes: [" + ", ".join(f"c{i}" for i in range(10)) + "]\n")

    def write(url, f, lab, prefix):
        E.write_shard(url, "00000", [f"{prefix}{i}" for i in range(len(lab))], lab, f)
        io.write_json(io.join(url, E.META), {"embed_dim": 32})
        io.mark_done(url)

    d = {k: str(tmp_path / k) for k in ("train", "test", "text", "pool", "leaky")}
    write(d["train"], task.train_feats, task.train_labels, "tr")
    write(d["test"], task.test_feats, task.test_labels, "te")
    write(d["pool"], task.priming_feats, task.priming_labels, "p")
    E.write_shard(d["text"], "text", [f"t{i}" for i in range(10)], list(range(10)), task.text, extra={"kind": ["template"] * 10, "prompt": [f"c{i}" for i in range(10)]})
    io.write_json(io.join(d["text"], E.META), {"num_classes": 10, "classnames": [f"c{i}" for i in range(10)]})
    io.mark_done(d["text"])
    out = str(tmp_path / "eval")
    assert main(["evaluate", "--dataset", str(y), "--task-train", d["train"], "--task-test", d["test"], "--text", d["text"], "--priming", d["pool"], "--shots", "0,2", "--seeds", "2", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "| priming | 0 |" in printed and "| few-shot + priming | 2 |" in printed
    res = io.read_json(io.join(out, "results.json"))
    assert {r["method"] for r in res["records"]} == {"zero-shot CLIP", "priming", "few-shot", "few-shot + priming"}
    write(d["leaky"], task.test_feats[:5], task.test_labels[:5], "te")  # test images inside train
    assert main(["evaluate", "--dataset", str(y), "--task-train", d["leaky"], "--task-test", d["test"], "--text", d["text"], "--out", str(tmp_path / "e2")]) == 2
