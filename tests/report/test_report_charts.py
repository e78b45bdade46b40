"""The report of a demo run with its charts and attribution: per-class accuracies against an
independent computation, the page's SVG in headless Chromium (DOM and a screenshot)."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from pipeline.app.cli import main
from pipeline.core import embeddings as E
from pipeline.core import io
from pipeline.report import page
from pipeline.report import per_class as P

CHARTS = ("accuracy-shots", "per-class-gain", "stages", "class-influence", "term-influence")


@pytest.fixture(scope="module")
def attributed_run(demo_run, tmp_path_factory):
    """A copy of the demo run with `primer attribute --drop-harmful` (over the run's own
    attribution) and `primer report`."""
    run = str(tmp_path_factory.mktemp("attributed") / "run")
    shutil.copytree(demo_run, run)
    assert main(["attribute", run, "--drop-harmful"]) == 2  # other settings: refused
    assert main(["attribute", run, "--drop-harmful", "--overwrite"]) == 0
    assert main(["report", run]) == 0
    return run


def test_per_class_accuracies_are_the_heads_on_the_test_split(attributed_run):
    run = attributed_run
    results = io.read_json(os.path.join(run, "eval", "results.json"))
    pc = P.compute(run, results)
    assert pc["priming"] == "transductive priming"  # the demo primes with its transductive set
    _, y, f = E.load(os.path.join(run, "emb", "task-test"))
    text = E.load_text(os.path.join(run, "emb", "text")).heads("template")
    _, p_y, p_f = E.load(os.path.join(run, "decisions", "transductive"))
    # An independent head: numpy sums of the unit priming features, the text row if none.
    p = p_f.astype(np.float32)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    sums = np.stack([p[p_y == c].sum(0) for c in range(10)])
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    m = np.where(norms > 1e-6, sums / np.maximum(norms, 1e-12), text)
    a = pc["alpha"]
    for name, w in (("zero-shot CLIP", text), ("transductive priming", a * text + (1 - a) * m)):
        pred = np.argmax(f.astype(np.float32) @ w.T, axis=1)
        want = [float(np.mean(pred[y == c] == c)) for c in range(10)]
        assert pc["methods"][name] == pytest.approx(want, abs=1e-12), name
    assert pc["n_test"] == np.bincount(y, minlength=10).tolist()
    # The zero-shot row of the table is the per-class accuracies' weighted mean.
    zs = next(r["accuracy"] for r in results["records"] if r["method"] == "zero-shot CLIP")
    assert np.average(pc["methods"]["zero-shot CLIP"], weights=pc["n_test"]) == pytest.approx(zs)
    written = io.read_json(os.path.join(run, "report", P.FILE))
    assert written["methods"].keys() == pc["methods"].keys() and written["alpha"] == a
    names, gain = P.gains(pc)
    assert names == pc["classnames"] and len(gain) == 10


def test_report_holds_the_charts_and_the_attribution(attributed_run):
    html = open(os.path.join(attributed_run, "report", "index.html"), encoding="utf-8").read()
    for name in CHARTS:
        assert f"data-chart='{name}'" in html, name
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "transductive priming, harmful images dropped" in html
    summary = page.collect_run(attributed_run, per_class=2)
    helpful, harmful = summary.attribution["helpful"], summary.attribution["harmful"]
    assert len(helpful) == len(harmful) == 12
    assert all(e.image for e in helpful + harmful)  # thumbnails found in the shards
    ranking = io.read_json(os.path.join(attributed_run, "attribution", "ranking.json"))
    assert [e.uid for e in helpful] == [r["uid"] for r in ranking["helpful"][:12]]
    assert html.count("class='card attributed'") == 24
    methods = {r["method"] for r in summary.records}
    assert {"zero-shot CLIP", "transductive priming, harmful images dropped"} <= methods
    figs = page.figures(summary)
    assert set(figs) == set(CHARTS)


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (make install adds it)",
)
def test_report_charts_render_in_headless_chromium(attributed_run, tmp_path):
    from PIL import Image

    from pipeline.report import charts

    url = f"file://{os.path.join(attributed_run, 'report', 'index.html')}"
    base = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--enable-logging=stderr",
        "--v=0",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    r = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    for name in CHARTS:  # parsed by the browser as SVG elements, not as text
        assert f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" data-chart="{name}"' in dom
    assert dom.count('<g class="series"') >= 4
    assert dom.count('<circle class="point"') >= 8
    assert dom.count('<rect class="bar"') >= 10 + 10 * 5 + 10
    console_errors = [
        ln
        for ln in r.stderr.splitlines()
        if "CONSOLE" in ln and ("Error" in ln or "Uncaught" in ln)
    ]
    assert not console_errors
    shot = tmp_path / "page.png"
    r = subprocess.run(
        [*base, "--window-size=1000,3000", f"--screenshot={shot}", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (3000, 1000)

    def pixels(colour: str) -> int:
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(img - rgb).sum(axis=2) <= 6).sum())

    # The charts were painted: the gain bars' green and the first series' blue.
    assert pixels(charts.GAIN) > 500 and pixels(charts.PALETTE[0]) > 500


def test_an_attribution_older_than_the_priming_set_is_flagged(attributed_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(attributed_run, run)
    assert page.collect_run(run, per_class=1).attribution["stale"] == []
    # The transductive filter redone (a new run id in its fingerprint) after the attribution.
    fp_file = os.path.join(run, "decisions", "transductive", "_FINGERPRINT")
    fp = io.read_json(fp_file)
    io.write_json(fp_file, {**fp, "run": "redone"})
    summary = page.collect_run(run, per_class=1)
    assert summary.attribution["stale"] == ["priming"]
    assert "changed after this attribution was made" in page.render_html(summary)
