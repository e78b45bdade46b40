"""Inspect a run directory: per-class counts through the stages, retrieved images with their
captions, match terms, scores and kept/dropped reasons, the accuracy table and charts, and
which priming images help (``primer attribute``'s ranking, when the run has one).

:func:`collect_run` gathers everything from the files the stages wrote (the per-class
accuracies are rebuilt from the cached embeddings, :mod:`pipeline.report.per_class`);
:func:`figures` draws the charts as inline SVG (:mod:`pipeline.report.charts`);
:func:`render_html` turns it all into one self-contained page (thumbnails embedded as data
URIs, no script, so it reads offline and can be mailed around). The notebook
``notebooks/inspect_subset.ipynb`` uses the same functions.
"""

from __future__ import annotations

import base64
import html
import io as _io
import json
import logging
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import io

log = logging.getLogger(__name__)


def layout() -> dict[str, str]:
    """Where each stage writes in a run directory, from ``primer subset``'s steps."""
    from pipeline.app.subset import STAGE_OUT

    names = {
        "matches": "filter", "shards": "download", "pool": "embed-pool",
        "task_train": "embed-task-train", "task_test": "embed-task-test", "text": "embed-text",
        "clip": "clip-filter", "transductive": "transductive", "subset": "materialise",
        "eval": "evaluate", "report": "report",
    }  # fmt: skip
    return {k: STAGE_OUT[v] for k, v in names.items()}


@dataclass
class Example:
    """One pool image as the report shows it."""

    uid: str
    label: int
    caption: str = ""
    matched_term: str = ""
    status: str = ""
    decisions: dict[str, tuple[bool, float, str]] = field(default_factory=dict)
    image: bytes | None = None
    influence: tuple[float, float] | None = None  # accuracy and mean margin lost without it

    @property
    def kept(self) -> bool:
        return bool(self.decisions) and all(k for k, _, _ in self.decisions.values())


@dataclass
class RunSummary:
    """What a run directory holds, per class."""

    run_dir: str
    classnames: list[str]
    counts: dict[str, list[int]]  # stage -> per-class count
    examples: dict[int, list[Example]]
    results_md: str = ""
    stats: dict[str, dict] = field(default_factory=dict)
    untrained: bool = False
    records: list[dict] = field(default_factory=list)  # the evaluation's rows, then attribution's
    per_class: dict | None = None
    attribution: dict | None = None  # ranking.json, with "helpful"/"harmful" as Examples


def _table(url: str, columns: list[str] | None = None) -> pa.Table | None:
    try:
        return io.read_parquet(url, columns=columns)
    except (FileNotFoundError, OSError):
        return None


def _read_json(url: str) -> dict:
    try:
        return io.read_json(url)
    except (FileNotFoundError, OSError, ValueError):
        return {}


def _per_class(labels: list[int], n: int) -> list[int]:
    c = Counter(labels)
    return [c.get(i, 0) for i in range(n)]


def _images_for(
    shards_url: str, uids: set[str], shards: set[str] | None = None, max_bytes: int = 2_000_000
) -> dict[str, bytes]:
    """Image bytes for ``uids`` from webdataset shards, reading members as data (never
    extracting). ``shards``: the names (``00000``) of the only tars to open, as the download
    manifest gives them; None opens every tar."""
    found: dict[str, bytes] = {}
    try:
        tars = io.list_files(shards_url, suffixes=(".tar",))
    except FileNotFoundError:
        return found
    if shards is not None:
        tars = [t for t in tars if t.rsplit("/", 1)[-1][: -len(".tar")] in shards]
    for t in tars:
        fs, path = io.url_to_fs(t)
        with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tf:
            pending: dict[str, dict[str, bytes]] = defaultdict(dict)
            for m in tf:
                if not m.isfile() or m.size > max_bytes:
                    continue
                key, _, ext = m.name.rpartition(".")
                data = tf.extractfile(m).read()  # type: ignore[union-attr]
                pending[key][ext] = data
                sample = pending[key]
                if "json" in sample and any(e in sample for e in ("jpg", "jpeg", "png", "webp")):
                    try:
                        uid = json.loads(sample["json"]).get("uid")
                    except ValueError:
                        uid = None
                    if uid in uids:
                        found[uid] = next(
                            sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample
                        )
                    del pending[key]
        if len(found) == len(uids):
            break
    return found


def collect_run(
    run_dir: str, per_class: int = 12, classnames: list[str] | None = None
) -> RunSummary:
    """Read a run directory's stage outputs into a :class:`RunSummary`.

    ``per_class`` caps the examples per class (kept ones first, best score first, then the
    dropped ones so the reader sees why). Missing stages are simply absent from the summary.
    """
    p = {k: io.join(run_dir, v) for k, v in layout().items()}
    if not any(io.is_done(p[k]) for k in ("matches", "shards", "pool", "clip", "transductive")):
        raise io.InputError(
            f"{run_dir} holds no stage output (no complete {', '.join(sorted(set(p.values())))}); "
            "give the run directory of a `primer subset` run, or run it first"
        )
    matches = _table(p["matches"])
    if classnames is None:
        text_meta = _read_json(io.join(p["text"], "meta.json"))
        classnames = list(text_meta.get("classnames") or [])
    if not classnames:
        cfg = _read_json(io.join(p["matches"], "_config.json"))
        if cfg.get("dataset"):
            from pipeline.core.config import load_dataset

            classnames = list(load_dataset(cfg["dataset"]).classes)
    n = len(classnames)
    counts: dict[str, list[int]] = {}
    examples: dict[str, Example] = {}
    if matches is not None and n:
        labels = matches.column("label").to_pylist()
        counts["matched"] = _per_class(labels, n)
        for row in matches.select(
            [c for c in ("uid", "label", "caption", "matched_term") if c in matches.column_names]
        ).to_pylist():
            examples[row["uid"]] = Example(
                row["uid"],
                int(row["label"]),
                row.get("caption") or "",
                row.get("matched_term") or "",
            )
    manifest = _table(io.join(p["shards"], "manifest.parquet"))
    shard_of: dict[str, str] = {}
    if manifest is not None and n:
        ok = manifest.filter(pc.equal(manifest.column("status"), "success"))
        counts["downloaded"] = _per_class(ok.column("label").to_pylist(), n)
        for uid, status, shard in zip(
            manifest.column("uid").to_pylist(),
            manifest.column("status").to_pylist(),
            manifest.column("shard").to_pylist(),
        ):
            if uid in examples:
                examples[uid].status = status
            if shard is not None:
                shard_of[uid] = str(shard)
    for name in ("clip", "transductive"):
        dec = _table(io.join(p[name], "decision.parquet"))
        if dec is None or not n:
            continue
        rows = dec.select(["uid", "label", "kept", "score", "reason"]).to_pylist()
        counts[f"{name} kept"] = _per_class([r["label"] for r in rows if r["kept"]], n)
        for r in rows:
            ex = examples.setdefault(r["uid"], Example(r["uid"], int(r["label"])))
            ex.decisions[name] = (bool(r["kept"]), float(r["score"]), str(r["reason"]))
    subset = _table(io.join(p["subset"], "manifest.parquet"))
    if subset is not None and n:
        counts["subset"] = _per_class(subset.column("label").to_pylist(), n)
    # Choose what to show per class: kept (best first), then dropped with reasons.
    by_class: dict[int, list[Example]] = defaultdict(list)
    for ex in examples.values():
        if ex.status and ex.status != "success":
            continue
        by_class[ex.label].append(ex)
    chosen: dict[int, list[Example]] = {}
    for c in range(n):
        exs = by_class.get(c, [])
        exs.sort(
            key=lambda e: (
                not e.kept,
                -max([s for _, s, _ in e.decisions.values()] or [0.0]),
                e.uid,
            )
        )
        kept = [e for e in exs if e.kept][: per_class * 2 // 3]
        dropped = [e for e in exs if not e.kept][: per_class - len(kept)]
        chosen[c] = kept + dropped
    wanted = {e.uid for exs in chosen.values() for e in exs}
    attribution = _attribution(run_dir, examples)
    if attribution:
        wanted |= {e.uid for k in ("helpful", "harmful") for e in attribution[k]}
    shards = {shard_of[u] for u in wanted if u in shard_of} if manifest is not None else None
    images = _images_for(p["shards"], wanted, shards) if wanted else {}
    for exs in [*chosen.values(), *(attribution[k] for k in ("helpful", "harmful") if attribution)]:
        for e in exs:
            e.image = images.get(e.uid)
    results = _read_json(io.join(p["eval"], "results.json"))
    records = [r for r in results.get("records", []) if "method" in r and "accuracy" in r]
    if attribution:
        records += attribution.get("rows", [])
    results_md = ""
    try:
        results_md = io.read_bytes(io.join(p["eval"], "results.md")).decode("utf-8")
    except (FileNotFoundError, OSError):
        pass
    stats = {
        k: _read_json(io.join(p[k], "stats.json"))
        for k in ("matches", "shards", "pool", "clip", "transductive", "subset")
    }
    pool_meta = _read_json(io.join(p["pool"], "meta.json"))
    return RunSummary(
        run_dir=run_dir,
        classnames=list(classnames),
        counts=counts,
        examples=chosen,
        results_md=results_md,
        stats={k: v for k, v in stats.items() if v},
        untrained=bool(pool_meta.get("untrained")),
        records=records,
        per_class=_per_class_of(run_dir, results),
        attribution=attribution,
    )


def _per_class_of(run_dir: str, results: dict) -> dict | None:
    from pipeline.report import per_class

    try:
        return per_class.compute(run_dir, results)
    except (io.InputError, OSError, ValueError, KeyError) as e:  # the chart is left out
        log.warning("no per-class accuracies for %s: %s", run_dir, e)
        return None


def _attribution(run_dir: str, examples: dict[str, Example], show: int = 12) -> dict | None:
    """``primer attribute``'s ranking.json, its ``show`` most helpful and most harmful images
    as :class:`Example` (caption and term from the ranking), and the re-evaluated rows."""
    from pipeline.evaluate.attribution import OUT_DIR

    out = io.join(run_dir, OUT_DIR)
    if not io.is_done(out):
        return None
    ranking = _read_json(io.join(out, "ranking.json"))
    if not ranking:
        return None
    for side in ("helpful", "harmful"):
        shown = []
        for r in ranking.get(side, [])[:show]:
            known = examples.get(r["uid"])
            shown.append(
                Example(
                    r["uid"],
                    int(r["label"]),
                    r.get("caption") or "",
                    r.get("matched_term") or "",
                    known.status if known else "",
                    dict(known.decisions) if known else {},
                    influence=(float(r["influence"]), float(r["margin_influence"])),
                )
            )
        ranking[side] = shown
    ranking["rows"] = _read_json(io.join(out, "dropped.json")).get("rows", [])
    ranking["stale"] = _stale(run_dir, out)
    return ranking


def _stale(run_dir: str, out: str) -> list[str]:
    """The inputs of the attribution that the run has since redone (by their fingerprints)."""
    from pipeline.core import fingerprint
    from pipeline.evaluate.attribution import run_sources

    made = (fingerprint.stored(out) or {}).get("inputs", {})
    now = run_sources(run_dir)["inputs"]
    return [
        k
        for k in ("train", "text", "priming")
        if k in made and k in now and made[k] != fingerprint.input_identity(now[k])
    ]


def _thumb(data: bytes | None, size: int = 128) -> str:
    if not data:
        return '<div class="noimg">no image</div>'
    try:
        from PIL import Image

        img = Image.open(_io.BytesIO(data))
        img.thumbnail((size, size))
        buf = _io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=80)
        data = buf.getvalue()
    except Exception:  # an undecodable image still gets a placeholder, not a broken report
        return '<div class="noimg">undecodable</div>'
    return f'<img alt="" src="data:image/jpeg;base64,{base64.b64encode(data).decode()}">'


def _md_table_to_html(md: str) -> str:
    """Render the pipe tables of results.md (and keep other lines as paragraphs)."""
    out, rows = [], []

    def flush():
        if rows:
            head, *body = rows
            out.append(
                "<table class='results'><tr>"
                + "".join(f"<th>{html.escape(c)}</th>" for c in head)
                + "</tr>"
            )
            for r in body:
                out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
            out.append("</table>")
            rows.clear()

    for line in md.splitlines():
        s = line.strip()
        if s.startswith("|"):
            cells = [c.strip() for c in s.strip("|").split("|")]
            if all(set(c) <= set("-: ") for c in cells):
                continue
            rows.append(cells)
        else:
            flush()
            if s.startswith("#"):
                out.append(f"<h3>{html.escape(s.lstrip('#').strip())}</h3>")
            elif s:
                out.append(f"<p>{html.escape(s.replace('**', ''))}</p>")
    flush()
    return "\n".join(out)


def figures(summary: RunSummary, max_terms: int = 40) -> dict[str, str]:
    """The run's charts as SVG strings, by name: ``accuracy-shots`` (every method against
    shots), ``per-class-gain`` (priming over zero-shot, per class, sorted), ``stages`` (images
    per class through the stages) and, with an attribution, ``class-influence`` and
    ``term-influence`` (accuracy lost on the labelled set when each is removed). A chart
    without data is left out."""
    from pipeline.report import charts
    from pipeline.report import per_class as pc

    out: dict[str, str] = {}
    series = charts.accuracy_series(summary.records)
    if series:
        out["accuracy-shots"] = charts.accuracy_chart(series)
    if summary.per_class:
        names, gain = pc.gains(summary.per_class)
        title = (
            f"Per-class gain of {summary.per_class['priming']} over zero-shot CLIP "
            f"(alpha {summary.per_class['alpha']:g})"
        )
        out["per-class-gain"] = charts.bar_chart(
            names, gain, "per-class-gain", title, "gain (points)", unit=" points"
        )
    if summary.counts and summary.classnames:
        out["stages"] = charts.stage_chart(summary.classnames, summary.counts)
    a = summary.attribution
    if a:
        n = a["summary"]["labelled"]["n"]
        out["class-influence"] = charts.bar_chart(
            [r["class"] for r in a["classes"]],
            [100 * r["influence"] for r in a["classes"]],
            "class-influence",
            f"Accuracy lost on {n} labelled images without each class's priming images",
            "points lost",
            unit=" points",
        )
        terms = a["terms"]
        if len(terms) > max_terms:  # the most helpful and the most harmful
            terms = terms[: max_terms // 2] + terms[-(max_terms // 2) :]
        out["term-influence"] = charts.bar_chart(
            [
                r["term"] if r["term"] == r["classes"] else f"{r['term']} ({r['classes']})"
                for r in terms
            ],
            [100 * r["influence"] for r in terms],
            "term-influence",
            f"Accuracy lost on {n} labelled images without each caption term's images",
            "points lost",
            unit=" points",
        )
    return out


def _cards(exs: list[Example], classnames: list[str]) -> str:
    esc = html.escape
    parts = ["<div class='grid'>"]
    for e in exs:
        lost, margin = e.influence or (0.0, 0.0)
        name = classnames[e.label] if 0 <= e.label < len(classnames) else str(e.label)
        parts.append(
            f"<div class='card attributed'>{_thumb(e.image)}"
            f"<div>{esc(html.unescape(e.caption)[:120])}</div><div><b>class:</b> {esc(name)}"
            f"</div><div><b>term:</b> {esc(e.matched_term)}</div>"
            f"<div>{100 * lost:+.2f} points, margin {margin:+.3g}</div></div>"
        )
    parts.append("</div>")
    return "".join(parts)


def _attribution_html(summary: RunSummary, figs: dict[str, str]) -> str:
    a = summary.attribution
    if not a:
        return ""
    s, esc = a["summary"], html.escape
    parts = [
        "<h2 id='attribution'>Which priming images help</h2>",
        f"<p>For the centroid head at alpha {s['alpha']:g} ({esc(s['alpha_rule'])}), the "
        f"change in accuracy on {s['labelled']['n']} labelled images of the train split "
        f"({esc(s['labelled']['source'])}; never test labels) when one priming image, caption "
        f"term or class is removed: {s['helpful']} of {s['n_images']} images help, "
        f"{s['harmful']} hurt, {s['neutral']} change nothing.</p>",
    ]
    if a.get("stale"):
        parts.append(
            f"<p class='warn'>The run's {esc(', '.join(a['stale']))} changed after this "
            "attribution was made: rerun <code>primer attribute RUN_DIR --overwrite</code>.</p>"
        )
    if a.get("rows"):
        parts.append(
            f"<p>Priming without the {s.get('dropped', 0)} harmful images, evaluated as the "
            "evaluate stage evaluates (its rows are in the chart above):</p>"
        )
        groups: dict[tuple[str, int], list[float]] = {}
        for r in a["rows"]:
            groups.setdefault((r["method"], int(r["shots"])), []).append(100 * r["accuracy"])
        parts.append(
            "<table class='results'><tr><th>method</th><th>shots</th><th>accuracy (%)</th></tr>"
        )
        for (m, k), v in groups.items():
            parts.append(f"<tr><td>{esc(m)}</td><td>{k}</td><td>{sum(v) / len(v):.2f}</td></tr>")
        parts.append("</table>")
    for name in ("class-influence", "term-influence"):
        if name in figs:
            parts.append(f"<div class='figure'>{figs[name]}</div>")
    parts.append("<h3>Most helpful priming images</h3><p>Accuracy lost without each.</p>")
    parts.append(_cards(a["helpful"], summary.classnames))
    parts.append(
        "<h3>Most harmful priming images</h3><p>Accuracy lost without each "
        "(negative: removing it helps).</p>"
    )
    parts.append(_cards(a["harmful"], summary.classnames))
    return "\n".join(parts)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:8px}.card{width:140px;font-size:11px;border:1px solid #ddd;padding:4px}
.card img{width:128px;height:128px;object-fit:contain;background:#eee}.kept{border-color:#2a2}.dropped{border-color:#c33;opacity:.8}
.noimg{width:128px;height:128px;background:#eee;display:flex;align-items:center;justify-content:center}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:8px}
.figure{margin:1em 0}.figure svg{max-width:100%;height:auto}
"""


def render_html(summary: RunSummary) -> str:
    """A self-contained HTML page for ``summary``."""
    esc = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Primer run: {esc(summary.run_dir)}</title><style>{_CSS}</style></head><body>"
    ]
    parts.append(f"<h1>Primer run</h1><p><code>{esc(summary.run_dir)}</code></p>")
    if summary.untrained:
        parts.append(
            "<p class='warn'>The embeddings come from an untrained model (<code>--pretrained none</code>): every score and accuracy here is meaningless except as a test of the pipeline.</p>"
        )
    figs = figures(summary)
    if summary.results_md:
        parts.append("<h2>Accuracy</h2>" + _md_table_to_html(summary.results_md))
    for name in ("accuracy-shots", "per-class-gain"):
        if name in figs:
            parts.append(f"<div class='figure'>{figs[name]}</div>")
    if summary.per_class:
        parts.append(
            f"<p>Per-class accuracies rebuilt from the run's embeddings at alpha "
            f"{summary.per_class['alpha']:g} ({esc(summary.per_class['alpha_from'])}).</p>"
        )
    stages = list(summary.counts)
    parts.append(
        "<h2>Images per class through the stages</h2><table><tr><th>label</th><th>class</th>"
    )
    parts.extend(f"<th>{esc(s)}</th>" for s in stages)
    parts.append("</tr>")
    for c, name in enumerate(summary.classnames):
        parts.append(
            f"<tr><td>{c}</td><td><a href='#class-{c}'>{esc(name)}</a></td>"
            + "".join(f"<td>{summary.counts[s][c]}</td>" for s in stages)
            + "</tr>"
        )
    totals = "".join(f"<td>{sum(summary.counts[s])}</td>" for s in stages)
    parts.append(f"<tr><th></th><th>total</th>{totals}</tr></table>")
    if "stages" in figs:
        parts.append(f"<div class='figure'>{figs['stages']}</div>")
    parts.append(_attribution_html(summary, figs))
    parts.append("<h2>Retrieved images per class</h2>")
    for c, name in enumerate(summary.classnames):
        exs = summary.examples.get(c, [])
        parts.append(
            f"<h3 id='class-{c}' class='classname'>{c}: {esc(name)} <small>({len(exs)} shown)</small></h3><div class='grid'>"
        )
        if not exs:
            parts.append("<p>no retrieved images</p>")
        for e in exs:
            why = "; ".join(
                f"{k}: {'kept' if kept else esc(reason)} ({score:.3f})"
                for k, (kept, score, reason) in e.decisions.items()
            )
            parts.append(
                f"<div class='card {'kept' if e.kept else 'dropped'}'>{_thumb(e.image)}"
                f"<div>{esc(html.unescape(e.caption)[:120])}</div><div><b>term:</b> {esc(e.matched_term)}</div><div>{why or esc(e.status)}</div></div>"
            )
        parts.append("</div>")
    if summary.stats:
        parts.append("<h2>Stage statistics</h2>")
        for k, v in summary.stats.items():
            parts.append(
                f"<details><summary>{esc(k)}</summary><pre>{esc(json.dumps(v, indent=2, sort_keys=True)[:20000])}</pre></details>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str, out_url: str | None = None, per_class: int = 12) -> str:
    """Write ``<run_dir>/report/index.html`` (or ``out_url``), and beside it ``per_class.json``
    (the per-class accuracies its chart draws, when the run has them); returns its URL."""
    from pipeline.report.per_class import FILE

    out_url = out_url or io.join(run_dir, layout()["report"], "index.html")
    summary = collect_run(run_dir, per_class=per_class)
    page = render_html(summary)
    if summary.per_class:
        folder = out_url.rsplit("/", 1)[0] if "/" in out_url else "."
        io.write_json(io.join(folder, FILE), summary.per_class)
    io.write_bytes(out_url, page.encode("utf-8"))
    log.info("report written to %s", out_url)
    return out_url
