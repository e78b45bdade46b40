"""Inspect a run directory: per-class counts through the stages, retrieved images with their
captions, match terms, scores and kept/dropped reasons, and the accuracy table.

:func:`collect_run` gathers everything from the files the stages wrote (no recomputation);
:func:`render_html` turns it into one self-contained page (thumbnails embedded as data URIs,
so it reads offline and can be mailed around). The notebook ``notebooks/inspect_subset.ipynb``
uses the same functions.
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
    shards = {shard_of[u] for u in wanted if u in shard_of} if manifest is not None else None
    images = _images_for(p["shards"], wanted, shards) if wanted else {}
    for exs in chosen.values():
        for e in exs:
            e.image = images.get(e.uid)
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
    )


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


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:8px}.card{width:140px;font-size:11px;border:1px solid #ddd;padding:4px}
.card img{width:128px;height:128px;object-fit:contain;background:#eee}.kept{border-color:#2a2}.dropped{border-color:#c33;opacity:.8}
.noimg{width:128px;height:128px;background:#eee;display:flex;align-items:center;justify-content:center}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:8px}
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
    if summary.results_md:
        parts.append("<h2>Accuracy</h2>" + _md_table_to_html(summary.results_md))
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
    """Write ``<run_dir>/report/index.html`` (or ``out_url``); returns its URL."""
    out_url = out_url or io.join(run_dir, layout()["report"], "index.html")
    page = render_html(collect_run(run_dir, per_class=per_class))
    io.write_bytes(out_url, page.encode("utf-8"))
    log.info("report written to %s", out_url)
    return out_url
