"""``primer attribute``: which priming images help the primed head, and which hurt it.

For the training-free centroid head (template text head, alpha chosen on the labelled set
unless fixed), every priming image, caption term (the text filter's ``matched_term``) and
class is scored by the exact change in accuracy on a labelled set when it alone is removed
(:mod:`pipeline.evaluate.influence`), following Jain et al., "A Data-Based Perspective on
Transfer Learning" (CVPR 2023), which ranks source classes by their influence on a target
task. The labelled set is the train split (or a seeded sample of it, or the shots the
evaluation draws); test labels are never read. With ``drop_harmful`` the images whose
removal alone raises labelled accuracy are dropped in a decision and the evaluate stage's own
function scores it, reported as "priming, harmful images dropped" rows.

Writes under ``out``: ``images.parquet``, ``terms.parquet``, ``classes.parquet`` (rank 1 =
most helpful), ``ranking.json`` (settings, summary, classes, terms and the ``top`` images at
either end), with ``drop_harmful`` also ``dropped/`` (a decision), ``eval-dropped/`` and
``dropped.json``; ``_SUCCESS`` last.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import embeddings as E
from pipeline.core import fingerprint, io
from pipeline.core.config import ConfigError, build, load_dataset, to_dict
from pipeline.evaluate import influence as I
from pipeline.evaluate.classify import sample_shots

log = logging.getLogger(__name__)

OUTPUT_FORMAT = 1
OUT_DIR = "attribution"  # under a run directory
DROPPED = ", harmful images dropped"  # suffix of the re-evaluated rows' method
_NO_TERM = ""


@dataclass(frozen=True)
class AttributeConfig:
    """Settings of ``primer attribute`` (section ``attribute``, conf/stages/attribute.yaml).

    Attributes:
        labelled: ``train`` (the train split's images, never test) or ``shots`` (``shots`` per
            class drawn as the evaluation draws them for ``seed``).
        max_per_class: ``train``: at most this many images per class (seeded); 0 = all.
        shots: ``shots``: examples per class.
        seed: seeds the sample or the shot draw.
        alpha: weight of the text head in [0, 1], or ``auto``: the best on the labelled set.
        top: images listed at each end of ranking.json (and shown by the report).
        drop_harmful: drop the harmful images and re-evaluate with the evaluate stage.
        max_drop: at most this many images dropped (most harmful first); 0 = every one.
    """

    labelled: str = "train"
    max_per_class: int = 32
    shots: int = 5
    seed: int = 0
    alpha: str = "auto"
    top: int = 24
    drop_harmful: bool = False
    max_drop: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.labelled not in ("train", "shots"):
            problems.append(f"labelled must be train or shots, not {self.labelled!r}")
        if self.max_per_class < 0 or self.max_drop < 0 or self.top < 0:
            problems.append("max_per_class, max_drop and top must be >= 0")
        if self.shots < 1:
            problems.append("shots must be >= 1")
        if self.alpha != "auto":
            try:
                ok = 0.0 <= float(self.alpha) <= 1.0
            except ValueError:
                ok = False
            if not ok:
                problems.append(f"alpha must be 'auto' or a number in [0, 1], not {self.alpha!r}")
        if problems:
            raise ValueError("; ".join(problems))


def labelled_rows(labels: np.ndarray, cfg: AttributeConfig, num_classes: int) -> np.ndarray:
    """Indices (sorted) of the train-split rows that score the head."""
    y = np.asarray(labels, np.int64)
    if cfg.labelled == "shots":
        return sample_shots(y, cfg.shots, cfg.seed, num_classes)
    if cfg.max_per_class == 0:
        return np.arange(len(y))
    return sample_shots(y, cfg.max_per_class, cfg.seed, num_classes)


@dataclass
class Attribution:
    """Rankings (rank 1 = most helpful) and what produced them."""

    images: pa.Table
    terms: pa.Table
    classes: pa.Table
    summary: dict


def _ranked(columns: dict, effects: I.Effects, keep: np.ndarray, key: list) -> pa.Table:
    """A table of the kept groups with their effects, most helpful first (ties: by margin,
    then by ``key``)."""
    infl, marg = effects.influence[keep], effects.margin_influence[keep]
    order = np.lexsort((np.asarray(key, dtype=object)[keep].astype(str), -marg, -infl))
    cols = {k: np.asarray(v, dtype=object)[keep][order] for k, v in columns.items()}
    table = pa.table(
        {
            **{k: pa.array(v.tolist()) for k, v in cols.items()},
            "influence": pa.array(infl[order]),
            "margin_influence": pa.array(marg[order]),
            "correct_without": pa.array(effects.correct[keep][order]),
        }
    )
    return table.append_column("rank", pa.array(np.arange(1, len(order) + 1, dtype=np.int64)))


def attribute(
    text: np.ndarray,
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    uids: np.ndarray,
    feats: np.ndarray,
    labels: np.ndarray,
    cfg: AttributeConfig,
    classnames: list[str],
    terms: np.ndarray | None = None,
    captions: np.ndarray | None = None,
) -> Attribution:
    """Rank the priming images (by uid), caption terms and classes; pure numpy.

    Args:
        text: the template text head ``[C, D]``.
        train_feats, train_labels: the train split (the labelled set comes from it).
        uids, feats, labels: the priming rows (a uid under two labels is one image).
        terms, captions: per priming row, its matched term and caption ("" where unknown).
    """
    c = len(classnames)
    rows = labelled_rows(train_labels, cfg, c)
    lx, ly = np.asarray(train_feats)[rows], np.asarray(train_labels, np.int64)[rows]
    y = np.asarray(labels, np.int64)
    sums = I.class_sums(feats, y, c)
    if cfg.alpha == "auto":
        alpha, _ = I.best_alpha(text, sums, lx, ly)
        rule = "best on the labelled set"
    else:
        alpha, rule = float(cfg.alpha), "fixed"
    head = I.score(text, sums, alpha, lx, ly)
    n = len(y)
    terms = np.full(n, _NO_TERM, object) if terms is None else np.asarray(terms, object)
    captions = np.full(n, "", object) if captions is None else np.asarray(captions, object)
    # Images: one group per uid, described by its first row.
    u_codes, first, inv = np.unique(
        np.asarray(uids).astype(str), return_index=True, return_inverse=True
    )
    img = I.group_effects(head, feats, y, inv, len(u_codes))
    names = np.asarray(classnames, dtype=object)
    images = _ranked(
        {
            "uid": u_codes,
            "label": y[first],
            "class": names[y[first]],
            "matched_term": terms[first],
            "caption": captions[first],
        },
        img,
        np.ones(len(u_codes), bool),
        u_codes,
    )
    # Terms: rows without one (kNN candidates) belong to no term group.
    has = np.array([bool(t) for t in terms], bool)
    t_codes, t_inv = np.unique(terms[has].astype(str), return_inverse=True)
    term_eff = I.group_effects(head, np.asarray(feats)[has], y[has], t_inv, len(t_codes))
    t_classes = [sorted({int(v) for v in y[has][t_inv == j]}) for j in range(len(t_codes))]
    terms_t = _ranked(
        {
            "term": t_codes,
            "classes": [", ".join(names[k] for k in ks) for ks in t_classes],
            "n_images": np.bincount(t_inv, minlength=len(t_codes)),
        },
        term_eff,
        np.ones(len(t_codes), bool),
        t_codes,
    )
    cls = I.group_effects(head, feats, y, y, c)
    counts = np.bincount(y, minlength=c)
    classes = _ranked(
        {"label": np.arange(c), "class": names, "n_images": counts}, cls, counts > 0, names
    )
    infl = img.influence
    summary = {
        "alpha": alpha,
        "alpha_rule": rule,
        "labelled": {"source": cfg.labelled, "n": int(len(ly)), "split": "train"},
        "base_accuracy": head.correct.mean() if len(ly) else float("nan"),
        "n_priming_rows": n,
        "n_images": len(u_codes),
        "helpful": int((infl > 0).sum()),
        "harmful": int((infl < 0).sum()),
        "neutral": int((infl == 0).sum()),
    }
    return Attribution(images, terms_t, classes, summary)


def harmful_uids(images: pa.Table, max_drop: int = 0) -> list[str]:
    """The uids whose removal alone raises labelled accuracy, most harmful first (at most
    ``max_drop``; 0 = all)."""
    bad = images.filter(pc.less(images.column("influence"), 0.0))
    bad = bad.sort_by(
        [("influence", "ascending"), ("margin_influence", "ascending"), ("uid", "ascending")]
    )
    uids = bad.column("uid").to_pylist()
    return uids[:max_drop] if max_drop else uids


# ----------------------------------------------------------------------- I/O shell


def _match_info(matches: str | None, uids: np.ndarray, labels: np.ndarray):
    """Each priming row's matched term and caption from the text filter's matches (joined on
    uid and label; "" where the matches do not have it)."""
    n = len(uids)
    terms, captions = np.full(n, _NO_TERM, object), np.full(n, "", object)
    if not matches or not io.is_done(matches):
        return terms, captions
    t = io.read_parquet(matches, columns=["uid", "label", "caption", "matched_term"])
    key = {
        (u, int(y)): (m or _NO_TERM, cap or "")
        for u, y, cap, m in zip(
            *(t.column(k).to_pylist() for k in ("uid", "label", "caption", "matched_term"))
        )
    }
    for i, (u, y) in enumerate(zip(uids, labels)):
        terms[i], captions[i] = key.get((str(u), int(y)), (_NO_TERM, ""))
    return terms, captions


def write_dropped(priming: str, out: str, drop: list[str]) -> None:
    """A decision keeping the priming rows but ``drop`` (by uid), the priming input's own
    settings kept (a transductive decision still reads as one to the evaluation)."""
    reason = "attribution: harmful"
    if E.is_decision(priming):
        table = E.read_decision(priming)
        gone = pc.is_in(table.column("uid"), pa.array(drop, pa.string()))
        was = table.column("kept")
        now_dropped = pc.and_(was, gone)
        table = table.set_column(
            table.schema.get_field_index("kept"), "kept", pc.and_(was, pc.invert(gone))
        )
        table = table.set_column(
            table.schema.get_field_index("reason"),
            "reason",
            pc.if_else(now_dropped, reason, table.column("reason")),
        )
        meta = {
            k: io.resolve(priming, v) if k in E.PATH_KEYS and isinstance(v, str) and v else v
            for k, v in E.read_meta(priming).items()
        }
    else:
        uids, labels, _ = E.load(priming)
        kept = ~np.isin(uids.astype(str), np.asarray(drop, dtype=str))
        table = pa.table(
            {
                "uid": pa.array(uids.astype(str).tolist(), pa.string()),
                "label": pa.array(labels.astype(np.int32)),
                "score": pa.array(np.zeros(len(uids), np.float32)),
                "kept": pa.array(kept),
                "reason": pa.array(np.where(kept, "kept", reason).tolist()),
            }
        )
        meta = {"pool": priming, "filter": "attribution"}
    stats = {"dropped": len(drop), "kept": int(pc.sum(table.column("kept")).as_py() or 0)}
    E.write_decision(out, table, {**meta, "dropped_by": "attribution"}, stats)


def dropped_rows(results: dict) -> list[dict]:
    """The priming rows of a re-evaluation, renamed "<method>, harmful images dropped"."""
    rows = []
    for r in results.get("records", []):
        if "priming" in str(r.get("method", "")).lower():
            rows.append({**r, "method": f"{r['method']}{DROPPED}"})
    return rows


def run_attribute(
    cfg: AttributeConfig,
    dataset: str,
    train: str,
    text: str,
    priming: str,
    out: str,
    matches: str | None = None,
    test: str | None = None,
    eval_cfg=None,
    overwrite: bool = False,
) -> dict:
    """Rank the priming images of ``priming`` on ``train``'s labelled images; write ``out``.

    ``matches`` (the text filter's output) names each image's caption term; ``test`` and
    ``eval_cfg`` (an EvaluateConfig) are needed only with ``drop_harmful``. Returns the
    summary (also when a complete output is reused).

    Raises:
        pipeline.core.io.InputError: an incomplete input, embeddings of different models, a
            class count that does not match, no priming images or no labelled image.
    """
    if cfg.drop_harmful and (not test or eval_cfg is None):
        raise io.InputError(
            "drop_harmful re-evaluates the dropped set: give the test split's embeddings "
            "(--task-test) too, or run on a run directory"
        )
    inputs = {"train": train, "text": text, "priming": priming}
    inputs.update({k: v for k, v in (("matches", matches), ("test", test)) if v})
    if not cfg.drop_harmful:
        inputs.pop("test", None)  # only the re-evaluation reads it
    spec = load_dataset(dataset, descriptions=False)
    fp = fingerprint.make(
        "attribute",
        OUTPUT_FORMAT,
        fingerprint.result_settings(cfg),
        {k: fingerprint.input_identity(v) for k, v in inputs.items()},
        dataset=spec.identity("classes"),
        evaluate=fingerprint.result_settings(eval_cfg) if cfg.drop_harmful else None,
    )
    if fingerprint.reuse(out, fp, overwrite):
        log.info("%s is complete and made from the same inputs and settings; reusing it", out)
        return io.read_json(io.join(out, "ranking.json"))["summary"]
    t0 = time.perf_counter()
    E.check_same_model({"train": train, "text": text, "priming": priming})
    te = E.load_text(text)
    c = spec.num_classes
    if te.num_classes != c:
        raise io.InputError(f"{text} has {te.num_classes} classes but {spec.name} has {c}")
    _, tr_y, tr_f = E.load(train)
    p_u, p_y, p_f = E.load(priming)
    ok = (p_y >= 0) & (p_y < c)
    p_u, p_y, p_f = p_u[ok], p_y[ok], p_f[ok]
    if len(p_y) == 0:
        raise io.InputError(f"{priming} holds no priming images of {spec.name}'s classes")
    terms, captions = _match_info(matches, p_u, p_y)
    result = attribute(
        te.heads("template"), tr_f, tr_y, p_u, p_f, p_y, cfg, list(spec.classes), terms, captions
    )
    if result.summary["labelled"]["n"] == 0:
        raise io.InputError(f"{train} holds no labelled images to score the head on")
    fingerprint.prepare(out, fp, overwrite)  # inputs checked: now the output is written
    summary = {**result.summary, "dataset": spec.name}
    if cfg.drop_harmful:
        drop = harmful_uids(result.images, cfg.max_drop)
        write_dropped(priming, io.join(out, "dropped"), drop)
        from pipeline.evaluate.stage import run_evaluate

        res = run_evaluate(
            eval_cfg,
            dataset,
            train,
            test,
            text,
            io.join(out, "eval-dropped"),
            io.join(out, "dropped"),
            True,
        )
        rows = dropped_rows(res)
        io.write_json(io.join(out, "dropped.json"), {"dropped": drop, "rows": rows})
        summary["dropped"] = len(drop)
        summary["dropped_rows"] = [
            {k: r[k] for k in ("method", "shots", "seed", "accuracy")} for r in rows
        ]
    for name in ("images", "terms", "classes"):
        io.write_parquet(getattr(result, name), io.join(out, f"{name}.parquet"))
    images = result.images.to_pylist()
    top = cfg.top
    ranking = {
        "config": to_dict(cfg),
        "inputs": inputs,
        "summary": summary,
        "classes": result.classes.to_pylist(),
        "terms": result.terms.to_pylist(),
        "helpful": images[:top],
        "harmful": images[::-1][:top] if top else [],
    }
    io.write_json(io.join(out, "ranking.json"), ranking)
    io.mark_done(out)
    log.info(
        "attribution of %d priming images (%d harmful) on %d labelled images written to %s in "
        "%.1f s",
        summary["n_images"],
        summary["harmful"],
        summary["labelled"]["n"],
        out,
        time.perf_counter() - t0,
    )
    return summary


def run_sources(run_dir: str) -> dict:
    """What ``primer attribute RUN_DIR`` reads from a ``primer subset`` run directory: the
    dataset, the complete embeddings the evaluation used (priming: the last complete filter
    decision the run enabled, else the pool), the matches, and the run's evaluate settings."""
    from pipeline.app.subset import STAGE_OUT

    try:
        run_cfg = io.read_json(io.join(run_dir, "config.json"))
    except (FileNotFoundError, OSError, ValueError):
        run_cfg = {}
    sub = run_cfg.get("subset") or {}
    path = {k: io.join(run_dir, v) for k, v in STAGE_OUT.items()}
    priming = next(
        (
            path[step]
            for step, on in (
                ("transductive", sub.get("transductive", True)),
                ("clip-filter", sub.get("clip_filter", True)),
                ("import-embeddings", True),
                ("embed-pool", True),
            )
            if on and io.is_done(path[step])
        ),
        None,
    )
    dataset = sub.get("dataset")
    if not dataset:
        try:
            dataset = io.read_json(io.join(path["filter"], "_config.json")).get("dataset")
        except (FileNotFoundError, OSError, ValueError):
            dataset = None
    eval_cfg = None
    if run_cfg.get("evaluate"):
        from pipeline.evaluate.stage import EvaluateConfig

        known = {f.name for f in dataclasses.fields(EvaluateConfig)}
        eval_cfg = build(
            EvaluateConfig, {k: v for k, v in run_cfg["evaluate"].items() if k in known}, "evaluate"
        )
    # The matches as the run kept them (after its caption sense filter, when on).
    matches = "caption-filter" if sub.get("caption_filter", True) else "filter"
    if not io.is_done(path[matches]):
        matches = "filter"
    inputs = {
        "train": path["embed-task-train"],
        "test": path["embed-task-test"],
        "text": path["embed-text"],
        "matches": path[matches],
        "priming": priming,
    }
    inputs = {k: v for k, v in inputs.items() if v and io.is_done(v)}  # what the run has
    return {"inputs": inputs, "dataset": dataset, "evaluate": eval_cfg}


def check_sources(dataset: str | None, inputs: dict) -> None:
    """Raise :class:`ConfigError` naming what ``primer attribute`` is missing."""
    missing = [k for k in ("train", "text", "priming") if not inputs.get(k)]
    if not dataset:
        missing.insert(0, "dataset")
    if missing:
        raise ConfigError(
            f"primer attribute needs {', '.join(missing)}: give a run directory written by "
            "primer subset, or --dataset, --task-train, --text and --priming"
        )


def result_line(summary: dict, out: str) -> str:
    """What ``primer attribute`` prints: the counts, then the re-evaluated rows (mean over
    seeds, in percent)."""
    s = summary
    lines = [
        f"{s['n_images']} priming images ranked on {s['labelled']['n']} labelled images "
        f"(alpha {s['alpha']:g}): {s['helpful']} helpful, {s['harmful']} harmful -> {out}"
    ]
    groups: dict[tuple[str, int], list[float]] = {}
    for r in s.get("dropped_rows", []):
        groups.setdefault((r["method"], r["shots"]), []).append(r["accuracy"])
    for (method, shots), accs in groups.items():
        lines.append(f"{method} | {shots} shots | {100 * float(np.mean(accs)):.2f}")
    return "\n".join(lines)


def run_call(call) -> dict:
    """The ``attribute`` stage on a registry :class:`~pipeline.app.registry.Call`: inputs from
    the options, the rest from the run directory when one is given (its own evaluate
    settings, so the re-evaluated rows compare with the run's table)."""
    inputs, p, out = dict(call.inputs), call.params, call.out
    dataset, eval_cfg = p.get("dataset"), call.section("evaluate")
    if p.get("run_dir"):
        found = run_sources(p["run_dir"])
        inputs = {**found["inputs"], **inputs}
        dataset = dataset or found["dataset"]
        eval_cfg = found["evaluate"] or eval_cfg
        out = out or io.join(p["run_dir"], OUT_DIR)
    check_sources(dataset, inputs)
    if not out:
        raise ConfigError("give --out, or a run directory (the output is RUN_DIR/attribution)")
    call.out = out
    summary = run_attribute(
        call.cfg,
        dataset,
        inputs["train"],
        inputs["text"],
        inputs["priming"],
        out,
        inputs.get("matches"),
        inputs.get("test"),
        eval_cfg,
        call.overwrite,
    )
    return {**summary, "line": result_line(summary, out)}
