"""The report's SVG charts: well-formed, marks placed by their values, data escaped, nothing
that runs or loads."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from pipeline.report import charts

NS = {"s": "http://www.w3.org/2000/svg"}
HOSTILE = "</svg><script>alert('x')</script> & \"q\""


def _parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # raises on anything not well-formed
    assert root.tag == "{http://www.w3.org/2000/svg}svg" and root.get("class") == "chart"
    assert root.find("s:title", NS) is not None
    tags = {el.tag.split("}")[1] for el in root.iter()}
    assert not tags & {"script", "foreignObject", "image", "a", "use"}
    assert not any(k.startswith("on") or "href" in k for el in root.iter() for k in el.attrib)
    return root


def _records():
    rows = [
        {"method": "zero-shot CLIP", "shots": 0, "seed": 0, "accuracy": 0.40, "extra": 1},
        {"method": "priming", "shots": 0, "seed": 0, "accuracy": 0.52},
    ]
    for k, accs in ((1, (0.45, 0.55)), (2, (0.60, 0.62)), (5, (0.70, 0.74))):
        for seed, a in enumerate(accs):
            rows.append({"method": "few-shot", "shots": k, "seed": seed, "accuracy": a})
            rows.append(
                {"method": "few-shot + priming", "shots": k, "seed": seed, "accuracy": a + 0.05}
            )
    rows.append({"method": "few-shot", "shots": 10, "seed": 0, "accuracy": float("nan")})
    return rows


def test_accuracy_series_groups_by_method_and_shots():
    s = charts.accuracy_series(_records())
    assert list(s) == ["zero-shot CLIP", "priming", "few-shot", "few-shot + priming"]
    assert s["priming"] == [(0, 52.0, 52.0, 52.0, 1)]
    k, mean, lo, hi, n = s["few-shot"][0]
    assert (k, n) == (1, 2) and (mean, lo, hi) == pytest.approx((50.0, 45.0, 55.0))
    assert [p[0] for p in s["few-shot"]] == [1, 2, 5]  # the NaN draw at 10 shots is left out


def test_accuracy_chart_places_every_point_by_its_value():
    series = charts.accuracy_series(_records())
    root = _parse(charts.accuracy_chart(series))
    assert root.get("data-chart") == "accuracy-shots"
    groups = root.findall(".//s:g[@class='series']", NS)
    assert [g.get("data-series") for g in groups] == list(series)
    points = root.findall(".//s:circle[@class='point']", NS)
    assert len(points) == sum(len(v) for v in series.values())
    # Higher accuracy is higher on the page (smaller y); equal shots share an x.
    by_value = sorted(points, key=lambda p: float(p.get("data-value")))
    ys = [float(p.get("cy")) for p in by_value]
    assert ys == sorted(ys, reverse=True)
    x_of = {}
    for p in points:
        x_of.setdefault(p.get("data-shots"), set()).add(p.get("cx"))
    assert all(len(v) == 1 for v in x_of.values()) and len(x_of) == 4
    xs = [float(next(iter(x_of[k]))) for k in ("0", "1", "2", "5")]
    assert xs == sorted(xs)
    # Methods without shots are levels across the plot; the others lines with a spread band.
    levels = {
        g.get("data-series") for g in groups if g.find("s:line[@class='level']", NS) is not None
    }
    assert levels == {"zero-shot CLIP", "priming"}
    bands = {
        g.get("data-series") for g in groups if g.find("s:polygon[@class='band']", NS) is not None
    }
    assert bands == {"few-shot", "few-shot + priming"}
    tooltips = [p.find("s:title", NS).text for p in points]
    assert "few-shot, 1 shots: 50.00% (min 45.00, max 55.00 over 2 draws)" in tooltips
    legend = [t.text for t in root.findall(".//s:g[@class='legend']/s:text", NS)]
    assert legend == list(series)


def test_bar_chart_sorts_colours_and_scales_bars():
    names = ["a", "b", "c", "d", "e"]
    values = [2.0, -4.0, 8.0, 0.0, float("nan")]
    root = _parse(charts.bar_chart(names, values, "gain", "Gain", "points"))
    bars = root.findall(".//s:rect[@class='bar']", NS)
    assert [b.get("data-name") for b in bars] == ["c", "a", "d", "b"]  # NaN left out
    colours = [b.get("fill") for b in bars]
    assert colours == [charts.GAIN, charts.GAIN, charts.NONE, charts.LOSS]
    heights = {b.get("data-name"): float(b.get("height")) for b in bars}
    assert heights["c"] == pytest.approx(4 * heights["a"], rel=1e-2)
    assert heights["b"] == pytest.approx(2 * heights["a"], rel=1e-2)
    zero = float(root.find("s:line[@class='zero']", NS).get("y1"))
    for b in bars:  # gains stand on the zero line, losses hang from it
        y, h = float(b.get("y")), float(b.get("height"))
        assert (y + h if float(b.get("data-value")) > 0 else y) == pytest.approx(zero, abs=0.11)
    labels = [t.text for t in root.findall(".//s:text[@class='bar-label']", NS)]
    assert labels == ["c", "a", "d", "b"]
    unsorted = _parse(charts.bar_chart(names, values, "gain", "Gain", "points", sort=False))
    got = [b.get("data-name") for b in unsorted.findall(".//s:rect[@class='bar']", NS)]
    assert got == ["a", "b", "c", "d"]


def test_many_bars_keep_their_names_in_tooltips_only():
    n = charts.MAX_LABELLED + 1
    root = _parse(charts.bar_chart([f"c{i}" for i in range(n)], range(n), "g", "G", "p"))
    assert len(root.findall(".//s:rect[@class='bar']", NS)) == n
    assert not root.findall(".//s:text[@class='bar-label']", NS)
    assert root.find(".//s:rect[@class='bar']/s:title", NS).text == f"c{n - 1}: +{n - 1:.2f}"
    empty = _parse(charts.bar_chart([], [], "g", "G", "p"))
    assert "nothing to show" in ET.tostring(empty, encoding="unicode")


def test_stage_chart_draws_a_bar_per_class_and_stage():
    counts = {"matched": [10, 4, 0], "downloaded": [9, 4, 0], "subset": [5, 2, 0]}
    root = _parse(charts.stage_chart(["shirt", "bag", "boot"], counts))
    groups = root.findall(".//s:g[@class='group']", NS)
    assert [g.get("data-class") for g in groups] == ["shirt", "bag", "boot"]
    for c, g in enumerate(groups):
        bars = g.findall("s:rect[@class='bar']", NS)
        assert [b.get("data-stage") for b in bars] == list(counts)
        assert [int(b.get("data-value")) for b in bars] == [v[c] for v in counts.values()]
    h = {
        (g.get("data-class"), b.get("data-stage")): float(b.get("height"))
        for g in groups
        for b in g.findall("s:rect", NS)
    }
    assert h[("shirt", "matched")] == pytest.approx(2 * h[("shirt", "subset")], abs=0.11)
    assert h[("boot", "matched")] == 0
    legend = [t.text for t in root.findall(".//s:g[@class='legend']/s:text", NS)]
    assert legend == list(counts)
    # Many classes: sorted by the first stage's count, names in the tooltips only.
    n = charts.MAX_LABELLED + 5
    many = {"matched": [(7 * i) % n for i in range(n)], "subset": [1] * n}
    root = _parse(charts.stage_chart([f"k{i}" for i in range(n)], many))
    firsts = [
        int(g.find("s:rect", NS).get("data-value"))
        for g in root.findall(".//s:g[@class='group']", NS)
    ]
    assert firsts == sorted(many["matched"], reverse=True)
    assert not root.findall(".//s:text[@class='bar-label']", NS)


def test_data_is_escaped_everywhere():
    records = [{"method": HOSTILE, "shots": 0, "seed": 0, "accuracy": 0.5}]
    svgs = [
        charts.accuracy_chart(charts.accuracy_series(records), title=HOSTILE),
        charts.bar_chart([HOSTILE], [1.0], "g", HOSTILE, HOSTILE),
        charts.stage_chart([HOSTILE], {HOSTILE: [3]}, title=HOSTILE),
    ]
    for svg in svgs:
        root = _parse(svg)
        assert "<script" not in svg
        texts = [el.text for el in root.iter() if el.text]
        assert any(HOSTILE in t for t in texts)  # shown as text, intact
        attrs = [v for el in root.iter() for v in el.attrib.values()]
        assert HOSTILE in attrs or any(HOSTILE in t for t in texts)


@pytest.mark.parametrize("lo, hi", [(0, 100), (10.0, 40.8), (-4, 8), (0.3, 0.31), (5, 5)])
def test_ticks_cover_the_range_with_round_steps(lo, hi):
    ticks = charts.nice_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi and 2 <= len(ticks) <= 12
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1
    step = steps.pop()
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert round(mantissa, 6) in (1, 2, 2.5, 5)
