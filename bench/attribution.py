"""``primer attribute``'s closed form against refitting the centroid head without each image.

Both give every priming image's exact leave-one-out effect on labelled accuracy: the closed
form rescores only the removed image's class column for all images at once
(:func:`pipeline.evaluate.influence.group_effects`); the refit rebuilds the class sums and
rescores every class, once per image (timed on a sample of images, scaled to all of them).
Prints seconds for all images and the ratio; the sampled refits are checked equal.

    python bench/attribution.py [--priming 5000] [--labelled 1000] [--classes 100] [--record]
"""

from __future__ import annotations

import argparse

import numpy as np
from _util import add_record_flag, record, table, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--priming", type=int, default=5000)
    ap.add_argument("--labelled", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--sample", type=int, default=100, help="refits timed (then scaled)")
    add_record_flag(ap)
    ap.add_argument(
        "--quick", action="store_true", help="a small run (seconds to a minute) for make bench"
    )
    args = ap.parse_args()
    if args.quick:
        args.priming, args.labelled, args.classes, args.sample = 1000, 200, 20, 20
    from pipeline.evaluate import influence as I

    rng = np.random.default_rng(0)
    c, d = args.classes, args.dim

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    centres = unit(rng.normal(size=(c, d)))
    text = unit(centres + 0.5 * rng.normal(size=(c, d)))
    p_y = rng.integers(0, c, args.priming)
    p_f = unit(centres[p_y] + 0.8 * rng.normal(size=(args.priming, d)))
    l_y = rng.integers(0, c, args.labelled)
    l_f = unit(centres[l_y] + 0.8 * rng.normal(size=(args.labelled, d)))
    alpha = 0.5
    r: dict = {}
    with timed(r, "closed"):
        head = I.score(text, I.class_sums(p_f, p_y, c), alpha, l_f, l_y)
        eff = I.group_effects(head, p_f, p_y, np.arange(args.priming), args.priming)
    sample = rng.choice(args.priming, min(args.sample, args.priming), replace=False)
    got = []
    with timed(r, "refit"):
        for i in sample:
            keep = np.arange(args.priming) != i
            w_head = I.score(text, I.class_sums(p_f[keep], p_y[keep], c), alpha, l_f, l_y)
            got.append(int(w_head.correct.sum()))
    assert got == eff.correct[sample].tolist(), "closed form and refit disagree"
    refit_all = r["refit"] / len(sample) * args.priming
    rows = [
        {"method": "closed form (all images)", "seconds": r["closed"], "ratio": 1.0},
        {
            "method": f"refit per image (scaled from {len(sample)})",
            "seconds": refit_all,
            "ratio": refit_all / r["closed"],
        },
    ]
    cols = ["method", "seconds", "ratio"]
    print(
        f"{args.priming} priming images, {args.labelled} labelled, {c} classes, dim {d}\n"
        + table(rows, cols)
    )
    record("attribution", rows, cols, args, note=f"{args.priming}x{args.labelled}x{c}x{d}")


if __name__ == "__main__":
    main()
