"""results.md: the accuracy table of an evaluation, one row per (protocol, method, shots)."""

from __future__ import annotations

import numpy as np

from pipeline.evaluate.metrics import interval

# Footnote marks of the alpha column, one per rule (pipeline.evaluate.alpha, .tip, .reference).
RULE_NOTES = {
    "pool": (
        "¹",
        "chosen against caption labels over the pool before the CLIP filter (kept images "
        "left out of their own class); no test image, no label of the task",
    ),
    "pool+knn-train": (
        "²",
        "the larger of the pool rule's alpha and the one whose predictions agree best with "
        "their neighbours' (kappa) over the train split's images, without their labels",
    ),
    "pool+knn-test": (
        "³",
        "the larger of the pool rule's alpha and the one whose predictions agree best with "
        "their neighbours' (kappa) over the test images, without their labels (the "
        "transductive selection used them already)",
    ),
    "knn-train": ("⁴", "neighbour agreement over the train split's images (no pool to score)"),
    "knn-test": ("⁵", "neighbour agreement over the test images (no pool to score)"),
    "cv-shots": (
        "⁶",
        "k-fold cross-validation over the shots (fold j holds out the j-th shot of every class)",
    ),
    "fallback": (
        "⁷",
        "nothing to validate on (1 shot per class, no priming images): the configured fallback",
    ),
    "reference": (
        "⁸",
        "the reference code's fixed alpha (its README: 0.7 for zero-shot Flowers102, 0.58 for "
        "2-shot Flowers102, 0.55 for 3-shot FGVC-Aircraft; 0.9 otherwise)",
    ),
}


def _pct(x: float) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{100 * x:.2f}"


def render_table(
    records: list[dict],
    title: str = "",
    notes: list[str] | None = None,
    warnings: list[str] | None = None,
) -> str:
    """Markdown: one row per (protocol, method, shots) in record order, with top-1 accuracy
    (mean over shot draws), its 95% interval (Wilson over the test images for one run,
    Student's t over the draws for several), mean per-class accuracy, the mean alpha (or
    Tip-Adapter's a, b) with a footnote mark for how it was chosen, whether test images were
    used, and the number of runs; then the footnotes and ``notes``. ``warnings`` go in bold
    above the table."""
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r.get("protocol", ""), r["method"], r["shots"]), []).append(r)
    lines = [
        f"# {title}" if title else "# Results",
        "",
        *[f"**{w}**\n" for w in warnings or []],
        "| protocol | method | shots | top-1 (%) | 95% interval | mean per-class (%) | alpha "
        "| test images | runs |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    used: list[str] = []
    for (protocol, method, shots), rs in groups.items():
        accs = [r["accuracy"] for r in rs]
        lo, hi, _ = interval(accs, int(rs[0].get("n_test", 0)))
        ci = f"{_pct(lo)} - {_pct(hi)}" if np.isfinite(lo) else "-"
        per_class = [r.get("mean_per_class") for r in rs if r.get("mean_per_class") is not None]
        alphas = [r["alpha"] for r in rs if r.get("alpha") is not None]
        tips = [(r["tip_a"], r["tip_b"]) for r in rs if r.get("tip_a") is not None]
        if alphas:
            setting = f"{np.mean(alphas):.2f}"
        elif tips:
            a, b = np.mean(tips, axis=0)
            setting = f"a={a:.2f} b={b:.1f}"
        else:
            setting = "-"
        for rule in dict.fromkeys(r.get("alpha_rule") for r in rs):
            if rule in RULE_NOTES:
                setting += RULE_NOTES[rule][0]
                if rule not in used:
                    used.append(rule)
        mpc = _pct(float(np.mean(per_class))) if per_class else "-"
        lines.append(
            f"| {protocol} | {method} | {shots} | {_pct(float(np.mean(accs)))} | {ci} | {mpc} "
            f"| {setting} | {rs[0].get('test_images', 'no')} | {len(rs)} |"
        )
    foot = [
        f"{RULE_NOTES[r][0]} {RULE_NOTES[r][1]}." for r in sorted(used, key=list(RULE_NOTES).index)
    ]
    if foot:
        foot.insert(0, "alpha: the text head's weight (Tip-Adapter: a, b), chosen as marked:")
    extra = foot + list(notes or [])
    if extra:
        lines.append("")
        lines += [f"{n}  " for n in extra[:-1]] + [extra[-1]]
    return "\n".join(lines) + "\n"
