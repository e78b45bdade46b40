"""Benchmark of the automatic alpha rules without shots, on synthetic worlds.

Each world (:mod:`pipeline.evaluate.worlds`) has Gaussian class clusters, a noisy text head,
a caption-noisy, imbalanced, shifted pool and the CLIP filter's agreement decision over it.
For every rule the gap is the test accuracy of the best fixed alpha, chosen with test labels,
minus that of the rule's alpha (points). Rules (pipeline/evaluate/alpha.py):

- loo-kept: leave-one-out over the kept pool (the rule Primer used before; collapses to 1);
- pool: caption labels over the pool before the filter;
- knn-train / knn-test: neighbour agreement over unlabelled train / test images;
- pool+knn-train: the default of the zero-shot priming rows; pool+knn-test: of the
  transductive ones (their head is then the test images' neighbours in the kept pool);
- fixed 0.5, and 0.9 (the reference code's default).

"misses" counts the worlds where the best alpha beats zero-shot CLIP by 5 points or more and
the rule's alpha does not. The stress worlds add nuisance styles the pool over-represents.

Usage: .venv/bin/python bench/alpha.py [--worlds 24] [--list]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from _util import add_record_flag, record, table

from pipeline.evaluate import alpha as A
from pipeline.evaluate.classify import class_sums
from pipeline.evaluate.protocols import TRANSDUCTIVE_PRIMING, ZERO_SHOT_PRIMING
from pipeline.evaluate.worlds import hindsight, make_world, standard_specs, stress_specs, world_task

GRID = A.ALPHA_GRID


def rule_alphas(world, protocol: str) -> tuple[dict[str, float], np.ndarray]:
    """Every rule's alpha for the world's priming set under ``protocol``, and the hindsight
    curve (test accuracy per grid alpha)."""
    p = world_task(world, protocol).primings[0]
    c = world.spec.classes
    sums, counts = class_sums(p.feats, p.labels, c), np.bincount(p.labels, minlength=c)
    t = world.text
    held = (p.held_feats, p.held_labels, p.held_in_head)
    out = {}
    if protocol == ZERO_SHOT_PRIMING:
        scores, _ = A.loo_alpha_scores(t, p.feats, p.labels, sums, counts)
        out["loo-kept"] = GRID[A.pick(scores)]
    out["pool"] = GRID[A.pick(A.pool_alpha_scores(t, sums, counts, *held)[0])]
    targets = {"train": world.train_feats, "test": world.test_feats}
    for name, feats in targets.items():
        nn = A.neighbours(feats)
        out[f"knn-{name}"] = GRID[A.pick(A.knn_alpha_scores(t, sums, feats, nn)[0])]
        if (name == "train") == (protocol == ZERO_SHOT_PRIMING):
            ch = A.choose_alpha_priming(t, sums, counts, held, feats, name, nn)
            out[ch.rule] = ch.value
    out["fixed 0.5"] = 0.5
    out["fixed 0.9"] = 0.9
    return out, hindsight(world, p, GRID)


def run(specs, protocol: str, listing: bool) -> list[dict]:
    gaps: dict[str, list[float]] = {}
    misses: dict[str, int] = {}
    per_world = []
    for spec in specs:
        world = make_world(spec)
        alphas, curve = rule_alphas(world, protocol)
        best, zs = curve.max(), curve[-1]
        row = {"classes": spec.classes, "zero-shot %": 100 * zs, "best %": 100 * best}
        row["best alpha"] = float(GRID[curve.argmax()])
        for rule, a in alphas.items():
            acc = curve[int(np.argmin(np.abs(GRID - a)))]
            gaps.setdefault(rule, []).append(100 * (best - acc))
            misses[rule] = misses.get(rule, 0) + int(best - zs >= 0.05 and acc - zs < 0.05)
            row[rule] = 100 * (best - acc)
        per_world.append(row)
    if listing:
        print(table(per_world, list(per_world[0])))
    helped = sum(1 for r in per_world if r["best %"] - r["zero-shot %"] >= 5)
    return [
        {
            "rule": rule,
            "mean gap": float(np.mean(g)),
            "max gap": float(np.max(g)),
            "misses": f"{misses[rule]} of {helped}",
        }
        for rule, g in gaps.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, default=24, help="worlds per set")
    ap.add_argument("--list", action="store_true", help="print every world's gaps too")
    add_record_flag(ap)
    ap.add_argument(
        "--quick", action="store_true", help="a small run (seconds to a minute) for make bench"
    )
    args = ap.parse_args()
    if args.quick:
        args.worlds = min(args.worlds, 4)
    print(
        f"alpha rules without shots ({os.cpu_count()} cores): gap to the best alpha in "
        f"hindsight, points of test accuracy, over {args.worlds} worlds per set"
    )
    cols = ["rule", "mean gap", "max gap", "misses"]
    recorded = []
    for title, specs in (
        ("standard", standard_specs(args.worlds)),
        ("stress", stress_specs(args.worlds)),
    ):
        for protocol in (ZERO_SHOT_PRIMING, TRANSDUCTIVE_PRIMING):
            print(f"\n{title} worlds, {protocol}:")
            rows = run(specs, protocol, args.list)
            print(table(rows, cols))
            recorded += [{"worlds": title, "protocol": protocol, **r} for r in rows]
    note = (
        f"gap to the best alpha in hindsight, points of test accuracy; {args.worlds} worlds per set"
    )
    record("alpha", recorded, ["worlds", "protocol", *cols], args, note=note)


if __name__ == "__main__":
    main()
