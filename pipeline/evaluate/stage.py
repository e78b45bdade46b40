"""Stage 6: the accuracy table of zero-shot CLIP, CuPL, priming, transductive priming and
few-shot heads on cached embeddings.

Protocols and rows: :mod:`pipeline.evaluate.protocols` and docs/evaluation.md. One run scores several priming sets at once, each under its protocol: ``--priming URL`` (the
protocol read from the decision: ``transductive priming`` for a transductive decision,
otherwise ``zero-shot priming``), repeated. Before any row, priming images that are near
copies of a test image (cosine >= ``neardup_threshold``, FAISS) are dropped, and for few-shot
rows also the copies of that draw's shots; captions naming two classes are dropped; the
counts per class go to results.json. Shots come from the train split, seeded by (seed,
shots), never from test; an image present in both splits stops the run (the reference's
SUN397 evaluated on images it also trained on). ``--alpha auto`` never looks at test labels
(:mod:`pipeline.evaluate.alpha`). ``--head tip-adapter`` replaces the centroid ensemble by a
class-balanced Tip-Adapter. ``--set evaluate.protocol=reference`` computes what the public
reference code computes instead (:mod:`pipeline.evaluate.reference`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from pipeline.core import embeddings as E
from pipeline.core import fingerprint, io
from pipeline.core.config import ConfigError, DatasetSpec, load_dataset, to_dict
from pipeline.evaluate import protocols as P
from pipeline.evaluate import reference as R
from pipeline.evaluate.classify import sample_shots
from pipeline.evaluate.labels import apply_map, label_map
from pipeline.evaluate.table import render_table
from pipeline.select import neardup

log = logging.getLogger(__name__)

# The results' layout (results.json, results.md); an output of another is never reused.
OUTPUT_FORMAT = 2

Task = P.Task
evaluate_task = P.evaluate_task


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of the evaluation (section ``evaluate``, conf/stages/evaluate.yaml).

    Attributes:
        shots: shot counts per class; 0 means the rows without shots.
        seeds: shot draws per shot count (seed 0..seeds-1).
        alpha: a number in [0, 1] (weight of the text head) or ``auto``.
        head: ``centroid`` (the priming ensemble) or ``tip-adapter``.
        protocol: ``primer`` (this project's protocol) or ``reference`` (what the public
            Neural Priming code computes: fixed alpha, its templates, no leak removal).
        alpha_target: zero-shot priming's ``auto`` alpha may use the train split's images
            without labels (``train``) or the pool alone (``none``).
        neardup_threshold: cosine at or above which a priming image counts as a copy of a
            test image or shot and is dropped; ``null`` keeps them all.
        tip_balance: Tip-Adapter's cache term is a per-class mean (true) or its sum.
        fallback_alpha: alpha when ``auto`` has nothing to validate on (1 shot, no priming).
        max_loo: pool images held out to choose alpha without shots (seeded sample).
        max_target: unlabelled target images the ``auto`` rule's neighbour agreement uses.
        tip_max_held: Tip-Adapter without shots: pool images held out to search (a, b).
        seed: seeds those samples.
    """

    shots: tuple[int, ...] = (0, 1, 2, 5, 10)
    seeds: int = 3
    alpha: str = "auto"
    head: str = "centroid"
    protocol: str = "primer"
    alpha_target: str = "train"
    neardup_threshold: float | None = 0.95
    tip_balance: bool = True
    fallback_alpha: float = 0.6
    max_loo: int = 20000
    max_target: int = 10000
    tip_max_held: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not self.shots or any(s < 0 for s in self.shots):
            problems.append("shots must be a non-empty list of counts >= 0")
        if self.seeds < 1:
            problems.append("seeds must be >= 1")
        if self.alpha != "auto":
            try:
                a = float(self.alpha)
            except ValueError:
                a = math.nan
            if not 0.0 <= a <= 1.0:
                problems.append(f"alpha must be 'auto' or a number in [0, 1], not {self.alpha!r}")
        if self.head not in ("centroid", "tip-adapter"):
            problems.append(f"head must be centroid or tip-adapter, not {self.head!r}")
        if self.protocol not in ("primer", "reference"):
            problems.append(f"protocol must be primer or reference, not {self.protocol!r}")
        if self.protocol == "reference" and self.head != "centroid":
            problems.append("protocol reference has the centroid head only")
        if self.alpha_target not in ("train", "none"):
            problems.append(f"alpha_target must be train or none, not {self.alpha_target!r}")
        if self.neardup_threshold is not None and not 0.0 < self.neardup_threshold <= 1.0:
            problems.append("neardup_threshold must be in (0, 1], or null to keep copies")
        if not 0.0 <= self.fallback_alpha <= 1.0:
            problems.append("fallback_alpha must be in [0, 1]")
        if min(self.max_loo, self.max_target, self.tip_max_held) < 1:
            problems.append("max_loo, max_target and tip_max_held must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))


def cupl_head(te: E.TextEmbeddings) -> np.ndarray | None:
    """CuPL's head ``norm((T_templates + T_descriptions) / 2)``; None without descriptions.

    Classes without descriptions keep their template row (the reference crashed on them).
    """
    if not te.has("description"):
        return None
    t, d = te.heads("template"), te.heads("description")
    has = np.linalg.norm(d, axis=1, keepdims=True) > 0
    mix = np.where(has, (t + d) / 2.0, t)
    return (mix / np.maximum(np.linalg.norm(mix, axis=1, keepdims=True), 1e-12)).astype(np.float32)


# ----------------------------------------------------------------------- loading


def _check_dim(url: str, feats: np.ndarray, dim: int) -> None:
    if len(feats) and feats.shape[1] != dim:
        raise io.InputError(f"{url}: embeddings have dim {feats.shape[1]}, the text head {dim}")


def _text_spec(te: E.TextEmbeddings, url: str, spec: DatasetSpec) -> DatasetSpec:
    """The dataset whose classes the text embeddings hold (the task's, or ImageNet's)."""
    if te.num_classes == spec.num_classes:
        if te.classnames and list(te.classnames) != list(spec.classes):
            raise io.InputError(f"{url} was embedded for other class names than {spec.name}'s")
        return spec
    name = E.read_meta(url).get("dataset")
    if not name:
        raise io.InputError(
            f"{url} has {te.num_classes} classes but {spec.name} has {spec.num_classes}"
        )
    other = load_dataset(name, descriptions=False)
    try:
        label_map(spec, other)
    except ConfigError as e:
        raise io.InputError(
            f"{url} has {te.num_classes} classes but {spec.name} has {spec.num_classes}: {e}"
        ) from None
    return other


def _heads(
    te: E.TextEmbeddings, cfg: EvaluateConfig, dataset: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """The template and CuPL heads in the text embeddings' own classes."""
    if cfg.protocol == "reference":
        if dataset in R.IMAGENET_FAMILY:
            mask = te.kinds == "template"
            try:
                t = R.template_head(
                    te.feats[mask],
                    te.labels[mask],
                    te.prompts[mask],
                    list(te.classnames),
                    R.IMAGENET_TEMPLATES,
                )
            except ValueError as e:
                raise io.InputError(str(e)) from None
        else:
            t = te.heads("template")
        cupl = R.cupl_average(t, te.heads("description")) if te.has("description") else None
        return t, cupl
    return te.heads("template"), cupl_head(te)


def _decision_keys(uids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.char.add(np.char.add(np.asarray(uids).astype(str), "|"), labels.astype(str))


def _source(url: str) -> tuple[str, np.ndarray | None, dict]:
    """``(root pool URL, kept (uid|label) keys or None for all, decision meta)``."""
    if not E.is_decision(url):
        return url, None, {}
    meta = E.read_meta(url)
    # Paths in a decision's meta are relative to it: resolved here, as absolute as the caller's.
    meta = {k: io.resolve(url, v) if k in E.PATH_KEYS and v else v for k, v in meta.items()}
    t = E.read_decision(url)
    kept = t.column("kept").to_numpy(zero_copy_only=False).astype(bool)
    uids = np.asarray(t.column("uid").to_pylist(), dtype=object)
    labels = t.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    root = meta["pool"]
    return root, _decision_keys(uids[kept], labels[kept]), meta


def _same_path(a: str, b: str) -> bool:
    if io.is_local(a) and io.is_local(b) and a and b:
        return os.path.abspath(a) == os.path.abspath(b)
    return a.rstrip("/") == b.rstrip("/")


def _uses_test(meta: dict, test: str, train: str) -> bool:
    """Whether a decision's selection looked at test images (its queries), refusing one that
    looked at their labels."""
    if meta.get("filter") != "transductive":
        return False
    queries = str(meta.get("queries", ""))
    if _same_path(queries, train):
        return False
    if (meta.get("config") or {}).get("mode") == "kshot":
        raise io.InputError(
            f"leakage: the transductive decision over {queries or 'unknown queries'} ran in kshot "
            "mode, which restricts each query's neighbours by the query's label: over test images "
            "that uses test labels. Use mode global or per_class, or the train split as queries"
        )
    return True


class _Pools:
    """Root pools loaded once, with their near-duplicates of the test images found once."""

    def __init__(self, test_feats: np.ndarray, dim: int, cfg: EvaluateConfig):
        self.test, self.dim, self.cfg, self.cache = test_feats, dim, cfg, {}

    def __call__(self, root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if root not in self.cache:
            uids, labels, feats = E.load(root)
            _check_dim(root, feats, self.dim)
            dups = np.zeros(0, np.int64)
            if self.cfg.protocol == "primer" and self.cfg.neardup_threshold and len(labels):
                pi, _ = neardup.near_duplicate_pairs(feats, self.test, self.cfg.neardup_threshold)
                dups = np.unique(pi)
            self.cache[root] = (uids, labels, feats, dups)
        return self.cache[root]


def _priming(
    protocol: str,
    url: str,
    pools: _Pools,
    task_space: DatasetSpec,
    src_spec: DatasetSpec,
    shot_rows: np.ndarray,
    train_f: np.ndarray,
    cfg: EvaluateConfig,
    test: str,
    train: str,
) -> P.Priming:
    """One priming set: the source's pool rows mapped to the task's classes, copies of test
    images (and of shots) found, captions naming two classes handled, and the alpha sample."""
    root, kept_keys, meta = _source(url)
    uses_test = _uses_test(meta, test, train)
    uids, labels, feats, dups = pools(root)
    n_pool = len(uids)
    stats: dict = {"source": url, "pool": root, "pool_images": n_pool}
    in_head = (
        np.ones(n_pool, bool)
        if kept_keys is None
        else np.isin(_decision_keys(uids, labels), kept_keys)
    )
    if len(labels) and (labels.min() < 0 or labels.max() >= src_spec.num_classes):
        raise io.InputError(
            f"{root}: pool labels outside [0, {src_spec.num_classes}) of {src_spec.name}: the pool "
            "was made for another dataset; name it with --priming-dataset (evaluate's "
            "priming_dataset), e.g. ImageNet for an ImageNet pool reused by ImageNet-R"
        )
    mapped = apply_map(labels, label_map(src_spec, task_space))
    valid = mapped >= 0
    stats["kept_by_filters"] = int(in_head.sum())
    stats["outside_classes"] = int((in_head & ~valid).sum())
    amb = R.ambiguous(uids, labels)
    names = list(task_space.classes)
    if cfg.protocol == "primer":
        stats["ambiguous_dropped"] = int((in_head & valid & amb).sum())
        valid &= ~amb
        dup = np.zeros(n_pool, bool)
        dup[dups] = True
        gone = np.flatnonzero(in_head & valid & dup)
        stats["near_duplicates_of_test"] = {
            "threshold": cfg.neardup_threshold,
            "total": int(len(gone)),
            "per_class": neardup.per_class_counts(mapped, gone, names),
        }
        valid &= ~dup
    head = in_head & valid
    if cfg.protocol == "reference":
        capped = head & ~_cap_mask(mapped, head)
        stats["capped"] = int(capped.sum())
        head &= ~capped
    rows = np.flatnonzero(head)
    p_f, p_y = feats[rows].astype(np.float32), mapped[rows]
    held = np.flatnonzero(valid) if cfg.protocol == "primer" else np.zeros(0, np.int64)
    if len(held) > cfg.max_loo:
        held = np.sort(np.random.default_rng([cfg.seed, 3]).choice(held, cfg.max_loo, False))
    shot_dups = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if cfg.protocol == "primer" and cfg.neardup_threshold and len(shot_rows) and len(rows):
        pi, si = neardup.near_duplicate_pairs(p_f, train_f[shot_rows], cfg.neardup_threshold)
        shot_dups = (pi, shot_rows[si])
        stats["near_duplicates_of_shots"] = {
            "threshold": cfg.neardup_threshold,
            "images": int(len(np.unique(pi))),
            "per_class": neardup.per_class_counts(p_y, np.unique(pi), names),
        }
    stats["priming_images"] = int(len(rows))
    return P.Priming(
        protocol,
        p_f,
        p_y,
        feats[held].astype(np.float32),
        mapped[held],
        head[held],
        shot_dups,
        stats,
        uses_test,
    )


def _cap_mask(labels: np.ndarray, head: np.ndarray) -> np.ndarray:
    keep = np.zeros(len(labels), bool)
    rows = np.flatnonzero(head)
    keep[rows] = R.cap_first(labels[rows], R.REFERENCE_CAP)
    return keep


def infer_protocol(url: str) -> str:
    """``transductive priming`` for a transductive decision, else ``zero-shot priming``."""
    if E.is_decision(url) and E.read_meta(url).get("filter") == "transductive":
        return P.TRANSDUCTIVE_PRIMING
    return P.ZERO_SHOT_PRIMING


def priming_sources(priming) -> dict[str, str]:
    """``{protocol: url}`` from a URL, a list of URLs (protocols read from the decisions) or a
    mapping. Raises :class:`ConfigError` for an unknown protocol or two sources under one."""
    if not priming:
        return {}
    if isinstance(priming, Mapping):
        items = list(priming.items())
    else:
        urls = [priming] if isinstance(priming, str) else list(priming)
        items = [(infer_protocol(u), u) for u in urls]
    out: dict[str, str] = {}
    for protocol, url in items:
        if protocol not in P.PRIMING_PROTOCOLS:
            raise ConfigError(
                f"unknown priming protocol {protocol!r} (known: {P.PRIMING_PROTOCOLS})"
            )
        if protocol in out:
            raise ConfigError(f"two priming sources for {protocol}: {out[protocol]} and {url}")
        out[protocol] = url
    return {p: out[p] for p in P.PRIMING_PROTOCOLS if p in out}


def load_task(
    dataset: str,
    train: str,
    test: str,
    text: str,
    priming=None,
    cfg: EvaluateConfig | None = None,
    priming_dataset: str | None = None,
) -> tuple[Task, dict]:
    """Load and check the embeddings of one evaluation.

    Args:
        priming: see :func:`priming_sources`.
        priming_dataset: the dataset whose labels the priming pools carry (default
            ``dataset``); ImageNet's pool serves ImageNet-R/-A through their indices.

    Returns ``(task, info)``; ``info`` has ``dataset``, ``untrained``, ``classes`` (the scored
    label space) and ``priming`` (each source's counts).

    Raises:
        pipeline.core.io.InputError: an incomplete input, train and test sharing an image
            (leakage), a class count, class names or dimension that does not match, an empty
            test split, a class without a template prompt embedding, or a transductive
            decision that used test labels.
    """
    cfg = cfg or EvaluateConfig()
    spec = load_dataset(dataset)
    E.check_same_model({"train": train, "test": test, "text": text, **priming_sources(priming)})
    te = E.load_text(text)
    text_space = _text_spec(te, text, spec)
    # The scored classes: the task's, or ImageNet's 1000 when the reference scores R/-A
    # through a 1000-class text head (as its code does).
    task_space = text_space if cfg.protocol == "reference" else spec
    t_all, cupl_all = _heads(te, cfg, spec.name)
    missing = np.flatnonzero(np.linalg.norm(t_all, axis=1) == 0)
    if len(missing):
        raise io.InputError(
            f"{text}: {len(missing)} classes have no template prompt embedding "
            f"(e.g. class {missing[0]} {text_space.classes[missing[0]]!r}); rerun embed-text"
        )
    rows = apply_map(np.arange(task_space.num_classes), label_map(task_space, text_space))
    if (rows < 0).any():
        raise io.InputError(f"{text} lacks classes of {task_space.name}")
    t = t_all[rows]
    cupl = None if cupl_all is None else cupl_all[rows]
    tr_u, tr_y, tr_f = E.load(train)
    te_u, te_y, te_f = E.load(test)
    leaked = np.intersect1d(tr_u.astype(str), te_u.astype(str))
    if len(leaked):
        raise io.InputError(
            f"leakage: {len(leaked)} images appear in both {train} and {test} (e.g. uid "
            f"{leaked[0]}); shots would be drawn from test images. Train and test must be disjoint"
        )
    if len(te_y) == 0:
        raise io.InputError(f"{test} holds no test embeddings")
    for url, y in ((train, tr_y), (test, te_y)):
        if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
            raise io.InputError(f"{url}: labels outside [0, {spec.num_classes}) for {spec.name}")
    for url, f in ((train, tr_f), (test, te_f)):
        _check_dim(url, f, t.shape[1])
    to_space = label_map(spec, task_space)
    tr_y, te_y = apply_map(tr_y, to_space), apply_map(te_y, to_space)
    tr_f, te_f = tr_f.astype(np.float32), te_f.astype(np.float32)
    c = task_space.num_classes
    src_spec = load_dataset(priming_dataset, descriptions=False) if priming_dataset else spec
    draws = [sample_shots(tr_y, k, s, c) for k in cfg.shots if k > 0 for s in range(cfg.seeds)]
    shot_rows = np.unique(np.concatenate(draws)) if draws else np.zeros(0, np.int64)
    untrained = any(
        bool(E.read_meta(u).get("untrained"))
        for u in (train, test, text)
        if io.exists(io.join(u, E.META))
    )
    if untrained and cfg.neardup_threshold is not None:
        # Untrained weights map every image near every other: all would count as copies.
        log.warning("untrained model weights: near-duplicate removal is off")
        cfg = replace(cfg, neardup_threshold=None)
    pools = _Pools(te_f, t.shape[1], cfg)
    primings = []
    for protocol, url in priming_sources(priming).items():
        p = _priming(protocol, url, pools, task_space, src_spec, shot_rows, tr_f, cfg, test, train)
        if not len(p.labels):
            log.warning("%s holds no priming images: the %s rows are left out", url, protocol)
        primings.append(p)
    info = {
        "dataset": spec.name,
        "classes": task_space.name if task_space is not spec else spec.name,
        "num_classes": c,
        "priming": {p.protocol: p.stats for p in primings},
        "untrained": untrained,
    }
    task = Task(tr_f, tr_y, te_f, te_y, t, cupl, c, primings, spec.name)
    return task, info


# --------------------------------------------------------------------------- stage


def _notes(task: Task, info: dict, cfg: EvaluateConfig) -> list[str]:
    notes = []
    if cfg.protocol == "reference":
        notes.append(
            "Reference protocol: what the public Neural Priming code computes (fixed alpha, its "
            "templates, unnormalised CuPL average, zero rows for empty classes, 1000 images per "
            "class, two-class captions under both, no leak removal); see docs/evaluation.md."
        )
    elif cfg.alpha != "auto":
        notes.append(f"alpha fixed at {float(cfg.alpha):g} (weight of the text head).")
    if cfg.head == "tip-adapter":
        cache = "class-balanced cache" if cfg.tip_balance else "summed cache"
        notes.append(
            f"Tip-Adapter head ({cache}): a, b searched on held-out shots or on the pool before "
            "the CLIP filter, never on test."
        )
    if info["classes"] != info["dataset"]:
        notes.append(
            f"Scored over {info['classes']}'s {task.num_classes} classes, as the reference does."
        )
    for p in task.primings:
        s = p.stats
        line = f"{p.protocol}: {s['priming_images']} priming images"
        dup = s.get("near_duplicates_of_test")
        if dup and dup["threshold"] is None:
            line += "; near copies of test images kept (removal off"
            line += ": untrained weights)" if info["untrained"] else ")"
        elif dup:
            line += (
                f"; {dup['total']} dropped as copies of test images (cosine >= {dup['threshold']})"
            )
        if s.get("ambiguous_dropped"):
            line += f"; {s['ambiguous_dropped']} dropped whose caption names two classes"
        if s.get("outside_classes"):
            line += f"; {s['outside_classes']} outside the scored classes"
        notes.append(line + ".")
    notes.append(
        f"{len(task.test_labels)} test and {len(task.train_labels)} train images. 95% interval: "
        "Wilson's over the test images for one run, Student's t over the shot draws for "
        "several. Test images 'unlabelled': the selection saw them, never their labels."
    )
    return notes


def run_evaluate(
    cfg: EvaluateConfig,
    dataset: str,
    train: str,
    test: str,
    text: str,
    out: str,
    priming=None,
    overwrite: bool = False,
    priming_dataset: str | None = None,
) -> dict:
    """Run stage 6: results.json, results.md, config.json, then ``_SUCCESS`` under ``out``.

    ``priming`` is one URL, a list of URLs, or ``{protocol: url}`` (see
    :func:`priming_sources`). Returns the results dict (also when a complete output is
    skipped). Raises :class:`pipeline.core.io.InputError` for bad inputs (see
    :func:`load_task`) and :class:`ConfigError` for a bad priming mapping.
    """
    sources = priming_sources(priming)
    inputs = {"train": train, "test": test, "text": text, **sources}
    spec = load_dataset(dataset, descriptions=False)
    fp = fingerprint.make(
        "evaluate",
        OUTPUT_FORMAT,
        fingerprint.result_settings(cfg),
        {k: fingerprint.input_identity(v) for k, v in inputs.items()},
        dataset=spec.identity("classes", "imagenet_indices"),
        priming_dataset=priming_dataset,
    )
    if not fingerprint.prepare(out, fp, overwrite):
        return io.read_json(io.join(out, "results.json"))
    t0 = time.perf_counter()
    task, info = load_task(dataset, train, test, text, sources, cfg, priming_dataset)
    t_load = time.perf_counter() - t0
    records = evaluate_task(task, cfg)
    warnings = []
    if info["untrained"]:
        warnings.append(
            "Untrained model weights (pretrained=none): these accuracies are meaningless."
        )
    title = f"{info['dataset']}: accuracy" + (
        " (reference protocol)" if cfg.protocol == "reference" else ""
    )
    table = render_table(records, title, _notes(task, info, cfg), warnings)
    result = {
        "dataset": dataset,
        "protocol": cfg.protocol,
        "num_classes": task.num_classes,
        "scored_classes": info["classes"],
        "n_train": len(task.train_labels),
        "n_test": len(task.test_labels),
        "priming": info["priming"],
        "untrained": info["untrained"],
        "records": records,
        "seconds": {"load": round(t_load, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    io.write_json(io.join(out, "results.json"), result)
    io.write_bytes(io.join(out, "results.md"), table.encode("utf-8"))
    config = {
        "dataset": dataset,
        "train": train,
        "test": test,
        "text": text,
        "priming": sources,
        "priming_dataset": priming_dataset,
    }
    io.write_json(io.join(out, "config.json"), {**config, **to_dict(cfg)})
    io.mark_done(out)
    log.info(
        "evaluation of %s written to %s in %.1f s", info["dataset"], out, time.perf_counter() - t0
    )
    return result
