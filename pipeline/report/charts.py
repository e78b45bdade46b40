"""Charts as inline SVG strings: pure functions of plain data, no plotting library, no script.

Each chart is one ``<svg class="chart" data-chart="NAME">`` element with a ``<title>``; its
marks carry classes (``series``, ``point``, ``bar``) and ``<title>`` tooltips, so a browser
shows values on hover without JavaScript and tests can find them. Every text that comes from
data (class names, methods, terms) is XML-escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np

# Tableau's ten colours: distinct, and readable by most colour-blind readers.
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
GAIN, LOSS, NONE = "#3a923a", "#c0392b", "#999999"
_FONT = "font-family='system-ui,sans-serif' font-size='11'"
# Above this many bars, names move from the axis into the tooltips.
MAX_LABELLED = 60


def esc(text: object) -> str:
    """``text`` escaped for XML content and attribute values."""
    return html.escape(str(text), quote=True)


def _f(x: float) -> str:
    return f"{x:.1f}"


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values covering [lo, hi], about ``target`` of them."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi <= lo:
        lo, hi = lo - 1.0, hi + 1.0
    raw = (hi - lo) / max(target - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks, t = [], start
    while t < hi + step - 1e-9:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _open(name: str, title: str, width: int, height: int) -> list[str]:
    return [
        f"<svg xmlns='http://www.w3.org/2000/svg' class='chart' data-chart='{esc(name)}' "
        f"width='{width}' height='{height}' viewBox='0 0 {width} {height}' role='img' "
        f"aria-label='{esc(title)}' {_FONT}>",
        f"<title>{esc(title)}</title>",
        f"<text class='chart-title' x='{width / 2:.1f}' y='16' text-anchor='middle' "
        f"font-size='13' font-weight='bold'>{esc(title)}</text>",
    ]


def _y_axis(ticks, y_of, left: float, right: float, label: str, top: float, bottom: float):
    out = ["<g class='axis y-axis'>"]
    for t in ticks:
        y = y_of(t)
        out.append(
            f"<line x1='{_f(left)}' x2='{_f(right)}' y1='{_f(y)}' y2='{_f(y)}' "
            f"stroke='#e4e4e4'/><text x='{_f(left - 6)}' y='{_f(y + 4)}' "
            f"text-anchor='end'>{t:g}</text>"
        )
    mid = (top + bottom) / 2
    out.append(
        f"<text x='14' y='{_f(mid)}' text-anchor='middle' transform='rotate(-90 14 {_f(mid)})'>"
        f"{esc(label)}</text></g>"
    )
    return out


def accuracy_series(
    records: Sequence[dict],
) -> dict[str, list[tuple[int, float, float, float, int]]]:
    """``method -> [(shots, mean, min, max, draws)]`` in percent, shots ascending, methods in
    the order they first appear. Reads only ``method``, ``shots`` and ``accuracy`` (one
    record per seed); a NaN accuracy is left out."""
    groups: dict[str, dict[int, list[float]]] = {}
    for r in records:
        acc = float(r["accuracy"])
        if math.isnan(acc):
            continue
        groups.setdefault(str(r["method"]), {}).setdefault(int(r["shots"]), []).append(acc * 100)
    return {
        m: [(k, float(np.mean(v)), min(v), max(v), len(v)) for k, v in sorted(by.items())]
        for m, by in groups.items()
    }


def accuracy_chart(
    series: dict[str, list[tuple[int, float, float, float, int]]],
    title: str = "Accuracy against shots per class",
    width: int = 680,
    height: int = 360,
) -> str:
    """The few-shot figure: one line per method over shots (mean over draws, the band is the
    draws' min to max); a method measured at 0 shots only is a dashed level across.

    ``series`` is :func:`accuracy_series`'s output.
    """
    series = {m: pts for m, pts in series.items() if pts}
    shots = sorted({k for pts in series.values() for k, *_ in pts}) or [0]
    legend_h = 18 * len(series) + 8
    left, right, top, bottom = 56.0, width - 16.0, 30.0, height - 40.0
    total_h = height + legend_h
    values = [v for pts in series.values() for _, _, lo, hi, _ in pts for v in (lo, hi)]
    v_lo, v_hi = min(values, default=0.0), max(values, default=100.0)
    pad = 0.04 * (v_hi - v_lo)  # no line drawn on the frame
    ticks = nice_ticks(max(v_lo - pad, 0.0), min(v_hi + pad, 100.0))
    lo, hi = ticks[0], ticks[-1]
    step = (right - left) / max(len(shots) - 1, 1)
    x_of = {
        k: left + (i * step if len(shots) > 1 else (right - left) / 2) for i, k in enumerate(shots)
    }

    def y_of(v: float) -> float:
        return bottom - (v - lo) / (hi - lo) * (bottom - top)

    out = _open("accuracy-shots", title, width, int(total_h))
    out += _y_axis(ticks, y_of, left, right, "accuracy (%)", top, bottom)
    out.append("<g class='axis x-axis'>")
    for k in shots:
        out.append(f"<text x='{_f(x_of[k])}' y='{_f(bottom + 16)}' text-anchor='middle'>{k}</text>")
    out.append(
        f"<text x='{_f((left + right) / 2)}' y='{_f(bottom + 32)}' text-anchor='middle'>"
        "shots per class</text></g>"
    )
    for i, (method, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        out.append(f"<g class='series' data-series='{esc(method)}'>")
        if len(pts) == 1 and len(shots) > 1:  # a level: measured without shots only
            y = y_of(pts[0][1])
            out.append(
                f"<line class='level' x1='{_f(left)}' x2='{_f(right)}' y1='{_f(y)}' "
                f"y2='{_f(y)}' stroke='{colour}' stroke-width='1.5' stroke-dasharray='5 4'/>"
            )
        elif len(pts) > 1:
            band = [(x_of[k], y_of(hi_)) for k, _, _, hi_, _ in pts]
            band += [(x_of[k], y_of(lo_)) for k, _, lo_, _, _ in reversed(pts)]
            out.append(
                "<polygon class='band' points='"
                + " ".join(f"{_f(x)},{_f(y)}" for x, y in band)
                + f"' fill='{colour}' fill-opacity='0.15' stroke='none'/>"
            )
            line = " ".join(f"{_f(x_of[k])},{_f(y_of(m))}" for k, m, *_ in pts)
            out.append(
                f"<polyline class='line' points='{line}' fill='none' stroke='{colour}' "
                "stroke-width='2'/>"
            )
        for k, m, lo_, hi_, n in pts:
            spread = f" (min {lo_:.2f}, max {hi_:.2f} over {n} draws)" if n > 1 else ""
            out.append(
                f"<circle class='point' cx='{_f(x_of[k])}' cy='{_f(y_of(m))}' r='3.5' "
                f"fill='{colour}' data-shots='{k}' data-value='{m:.4f}'><title>"
                f"{esc(method)}, {k} shots: {m:.2f}%{spread}</title></circle>"
            )
        out.append("</g>")
    out.append("<g class='legend'>")
    for i, method in enumerate(series):
        y = height + 4 + 18 * i
        colour = PALETTE[i % len(PALETTE)]
        out.append(
            f"<rect x='{_f(left)}' y='{y}' width='14' height='10' fill='{colour}'/>"
            f"<text x='{_f(left + 20)}' y='{y + 9}'>{esc(method)}</text>"
        )
    out.append("</g></svg>")
    return "".join(out)


def bar_chart(
    names: Sequence[str],
    values: Sequence[float],
    name: str,
    title: str,
    value_label: str,
    width: int = 680,
    height: int = 320,
    sort: bool = True,
    unit: str = "",
) -> str:
    """Vertical bars of ``values`` (signed: gains green, losses red, zero grey), largest first
    when ``sort``; a NaN value (nothing to measure) is left out. Names go under the bars up to
    :data:`MAX_LABELLED` bars, and into every bar's tooltip."""
    pairs = [(str(n), float(v)) for n, v in zip(names, values) if not math.isnan(float(v))]
    if sort:
        pairs.sort(key=lambda p: -p[1])  # stable: equal values keep the given order
    labelled = len(pairs) <= MAX_LABELLED
    longest = max((len(n) for n, _ in pairs), default=0)
    label_h = min(7 * longest, 140) + 10 if labelled else 10
    left, right, top = 56.0, width - 16.0, 30.0
    bottom = height - label_h
    vals = [v for _, v in pairs]
    ticks = nice_ticks(min(vals + [0.0]), max(vals + [0.0]))
    lo, hi = ticks[0], ticks[-1]

    def y_of(v: float) -> float:
        return bottom - (v - lo) / (hi - lo) * (bottom - top)

    out = _open(name, title, width, height)
    out += _y_axis(ticks, y_of, left, right, value_label, top, bottom)
    slot = (right - left) / max(len(pairs), 1)
    bar_w = max(slot * 0.8, 0.5)
    zero = y_of(0.0)
    out.append("<g class='bars'>")
    for i, (n, v) in enumerate(pairs):
        x = left + i * slot + (slot - bar_w) / 2
        y = min(zero, y_of(v))
        colour = GAIN if v > 0 else LOSS if v < 0 else NONE
        out.append(
            f"<rect class='bar' x='{_f(x)}' y='{_f(y)}' width='{bar_w:.2f}' "
            f"height='{abs(y_of(v) - zero):.2f}' fill='{colour}' data-name='{esc(n)}' "
            f"data-value='{v:.4f}'><title>{esc(n)}: {v:+.2f}{esc(unit)}</title></rect>"
        )
        if labelled:
            cx = x + bar_w / 2
            out.append(
                f"<text class='bar-label' x='{_f(cx)}' y='{_f(bottom + 12)}' text-anchor='end' "
                f"transform='rotate(-45 {_f(cx)} {_f(bottom + 12)})'>{esc(n)}</text>"
            )
    out.append(
        f"</g><line class='zero' x1='{_f(left)}' x2='{_f(right)}' y1='{_f(zero)}' "
        f"y2='{_f(zero)}' stroke='#444'/>"
    )
    if not pairs:
        out.append(
            f"<text x='{width / 2:.1f}' y='{_f((top + bottom) / 2)}' text-anchor='middle'>"
            "nothing to show</text>"
        )
    out.append("</svg>")
    return "".join(out)


def stage_chart(
    classnames: Sequence[str],
    counts: dict[str, Sequence[int]],
    title: str = "Images per class through the stages",
    width: int = 680,
    height: int = 340,
) -> str:
    """Grouped bars: per class, one bar per stage (matched, downloaded, kept by each filter,
    in the subset), in the order of ``counts``; a legend names the stages. Classes keep their
    order up to :data:`MAX_LABELLED`; more are sorted by the first stage's count, largest
    first, so the chart reads as a distribution (names in the tooltips)."""
    stages = list(counts)
    n = len(classnames)
    labelled = n <= MAX_LABELLED
    order = list(range(n))
    if not labelled and stages:
        first = counts[stages[0]]
        order.sort(key=lambda c: -int(first[c]))
    longest = max((len(c) for c in classnames), default=0)
    label_h = min(7 * longest, 140) + 10 if labelled else 10
    legend_h = 20
    left, right, top = 56.0, width - 16.0, 30.0 + legend_h
    bottom = height - label_h
    peak = max((max(v, default=0) for v in counts.values()), default=0)
    ticks = nice_ticks(0.0, float(max(peak, 1)))
    hi = ticks[-1]

    def y_of(v: float) -> float:
        return bottom - v / hi * (bottom - top)

    out = _open("stages", title, width, height)
    out += _y_axis(ticks, y_of, left, right, "images", top, bottom)
    out.append("<g class='legend'>")
    x = left
    for j, s in enumerate(stages):
        colour = PALETTE[j % len(PALETTE)]
        out.append(
            f"<rect x='{_f(x)}' y='26' width='12' height='10' fill='{colour}'/>"
            f"<text x='{_f(x + 16)}' y='35'>{esc(s)}</text>"
        )
        x += 28 + 6.5 * len(s)
    out.append("</g>")
    slot = (right - left) / max(n, 1)
    bar_w = max(slot * 0.85 / max(len(stages), 1), 0.3)
    for i, c in enumerate(order):
        cname = classnames[c]
        x0 = left + i * slot + slot * 0.075
        out.append(f"<g class='group' data-class='{esc(cname)}'>")
        for j, s in enumerate(stages):
            v = int(counts[s][c])
            y = y_of(v)
            out.append(
                f"<rect class='bar' x='{_f(x0 + j * bar_w)}' y='{_f(y)}' width='{bar_w:.2f}' "
                f"height='{_f(bottom - y)}' fill='{PALETTE[j % len(PALETTE)]}' "
                f"data-stage='{esc(s)}' data-value='{v}'><title>{esc(cname)}, {esc(s)}: {v}"
                "</title></rect>"
            )
        if labelled:
            cx = left + (i + 0.5) * slot
            out.append(
                f"<text class='bar-label' x='{_f(cx)}' y='{_f(bottom + 12)}' text-anchor='end' "
                f"transform='rotate(-45 {_f(cx)} {_f(bottom + 12)})'>{esc(cname)}</text>"
            )
        out.append("</g>")
    out.append(
        f"<line x1='{_f(left)}' x2='{_f(right)}' y1='{_f(bottom)}' y2='{_f(bottom)}' "
        "stroke='#444'/></svg>"
    )
    return "".join(out)
