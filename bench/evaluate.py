"""Benchmark of stage 6: a full accuracy table on cached embeddings, on CPU.

A synthetic 200-class task in CLIP's 512 dimensions (float16 unit vectors, as stored): 20
train and 50 test images per class, 100k priming images (20k with --quick), shots 0,1,2,5,10
and 3 seeds. Rows:

- baseline: the same centroid table built the direct way, every head refitted from the raw
  features with ``np.add.at`` (what a straightforward implementation does), alpha fixed;
- centroid, alpha fixed / auto: :func:`pipeline.evaluate.stage.evaluate_task` (priming class sums
  computed once, the pool rule and k-fold alpha choice in closed form, neighbour agreement
  over the train split with FAISS);
- tip-adapter: the Tip-Adapter head with its (a, b) search, cache = priming + shots;
- run_evaluate: the stage end to end, reading the embeddings from disk, removing near copies of
  test images (FAISS) and writing results.

Usage: .venv/bin/python bench/evaluate.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
from _util import add_record_flag, record, table, timed

from pipeline.core import embeddings as E
from pipeline.core import io
from pipeline.evaluate import classify as C
from pipeline.evaluate.protocols import Priming
from pipeline.evaluate.stage import EvaluateConfig, Task, evaluate_task, run_evaluate

CLASSES, DIM = 200, 512


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_task(n_priming: int, seed: int = 0) -> Task:
    """Class clusters around a shared direction (CLIP features are far from isotropic), a noisy
    text head (zero-shot ~59%), and priming images of which a quarter carry a wrong caption
    label, as LAION captions do."""
    rng = np.random.default_rng(seed)
    common = unit(rng.standard_normal(DIM).astype(np.float32))
    centers = unit(common + 0.5 * unit(rng.standard_normal((CLASSES, DIM), np.float32)))
    text = unit(centers + 0.4 * unit(rng.standard_normal((CLASSES, DIM), np.float32)))

    def draw(per_class=None, n=None):
        y = np.repeat(np.arange(CLASSES), per_class) if per_class else rng.integers(0, CLASSES, n)
        noise = unit(rng.standard_normal((len(y), DIM), np.float32))
        # Stored as float16, like the embedding stage writes them.
        return unit(centers[y] + 2.5 * noise).astype(np.float16).astype(np.float32), y

    tf, ty = draw(per_class=20)
    xf, xy = draw(per_class=50)
    pf, py = draw(n=n_priming)
    wrong = rng.random(n_priming) < 0.25
    py[wrong] = rng.integers(0, CLASSES, int(wrong.sum()))
    priming = Priming("zero-shot priming", pf, py, pf, py, np.ones(len(py), bool))
    return Task(tf, ty, xf, xy, text.astype(np.float32), None, CLASSES, [priming], "bench")


def naive_table(task: Task, cfg: EvaluateConfig) -> list[float]:
    """The baseline: every row's head refitted from the concatenated raw features."""

    def weights(feats, labels, alpha):
        m = np.zeros_like(task.text)
        np.add.at(m, labels, feats)
        n = np.linalg.norm(m, axis=1, keepdims=True)
        m = np.where(n > 0, m / np.maximum(n, 1e-12), task.text)
        return alpha * task.text + (1 - alpha) * m

    a = float(cfg.alpha)
    accs = [C.accuracy(task.test_feats, task.test_labels, task.text)]
    accs.append(
        C.accuracy(
            task.test_feats,
            task.test_labels,
            weights(task.primings[0].feats, task.primings[0].labels, a),
        )
    )
    for k in [s for s in cfg.shots if s > 0]:
        for seed in range(cfg.seeds):
            idx = C.sample_shots(task.train_labels, k, seed, CLASSES)
            sf, sy = task.train_feats[idx], task.train_labels[idx]
            accs.append(C.accuracy(task.test_feats, task.test_labels, weights(sf, sy, a)))
            f = np.concatenate([sf, task.primings[0].feats])
            y = np.concatenate([sy, task.primings[0].labels])
            accs.append(C.accuracy(task.test_feats, task.test_labels, weights(f, y, a)))
    return accs


def write_dirs(task: Task, root: str) -> dict:
    d = {k: os.path.join(root, k) for k in ("train", "test", "pool", "text")}
    for k, f, y in (
        ("train", task.train_feats, task.train_labels),
        ("test", task.test_feats, task.test_labels),
        ("pool", task.primings[0].feats, task.primings[0].labels),
    ):
        E.write_shard(d[k], "00000", [f"{k}{i}" for i in range(len(y))], y, f)
        io.write_json(io.join(d[k], E.META), {"embed_dim": DIM})
        io.mark_done(d[k])
    names = [f"c{i}" for i in range(CLASSES)]
    E.write_shard(
        d["text"],
        "text",
        [f"t{i}" for i in range(CLASSES)],
        np.arange(CLASSES),
        task.text,
        extra={"kind": ["template"] * CLASSES, "prompt": names},
    )
    io.write_json(io.join(d["text"], E.META), {"num_classes": CLASSES, "classnames": names})
    io.mark_done(d["text"])
    ds = os.path.join(root, "ds.yaml")
    with open(ds, "w") as f:
        f.write("classes: [" + ", ".join(names) + "]\n")
    d["dataset"] = ds
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20k priming images instead of 100k")
    add_record_flag(ap)
    args = ap.parse_args()
    n_priming = 20_000 if args.quick else 100_000
    task = make_task(n_priming)
    shots, seeds = (0, 1, 2, 5, 10), 3
    fixed = EvaluateConfig(shots=shots, seeds=seeds, alpha="0.5")
    times: dict[str, float] = {}
    out: dict[str, list] = {}
    with timed(times, "baseline (np.add.at refit per row)"):
        out["baseline (np.add.at refit per row)"] = naive_table(task, fixed)
    cases = [
        ("centroid, alpha 0.5", fixed),
        ("centroid, alpha auto", EvaluateConfig(shots=shots, seeds=seeds)),
        ("tip-adapter", EvaluateConfig(shots=shots, seeds=seeds, head="tip-adapter")),
    ]
    for name, cfg in cases:
        with timed(times, name):
            out[name] = evaluate_task(task, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        d = write_dirs(task, tmp)
        name = "run_evaluate (read + auto + write)"
        with timed(times, name):
            res = run_evaluate(
                EvaluateConfig(shots=shots, seeds=seeds),
                d["dataset"],
                d["train"],
                d["test"],
                d["text"],
                os.path.join(tmp, "eval"),
                d["pool"],
            )
        out[name] = res["records"]
    base = times["baseline (np.add.at refit per row)"]
    rows = []
    for name, s in times.items():
        recs = out[name]
        acc = {}
        if recs and isinstance(recs[0], dict):
            for r in recs:
                acc.setdefault(r["method"], []).append(r["accuracy"])
        rows.append(
            {
                "case": name,
                "seconds": s,
                "table rows/s": len(recs) / s,
                "speedup vs baseline": base / s,
                "zero-shot %": 100 * (acc["zero-shot CLIP"][0] if acc else recs[0]),
                "priming %": 100 * (acc["priming"][0] if acc else recs[1]),
                "10-shot+priming %": 100
                * (
                    np.mean(acc["few-shot + priming"][-seeds:])
                    if acc
                    else np.mean(recs[-2 * seeds + 1 :: 2])
                ),
            }
        )
    what = f"stage 6 on CPU ({os.cpu_count()} cores): {CLASSES} classes, dim {DIM}, {len(task.train_labels)} train, {len(task.test_labels)} test, {n_priming} priming images, shots {shots} x {seeds} seeds"
    print(what)
    cols = ["case", "seconds", "table rows/s", "speedup vs baseline", "zero-shot %", "priming %",
            "10-shot+priming %"]  # fmt: skip
    print(table(rows, cols))
    record("evaluate", rows, cols, args, note=what)


if __name__ == "__main__":
    main()
