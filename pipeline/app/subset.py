"""``primer subset``: every stage of the registry, in order, under one run directory.

text filter -> download -> embed (pool, task train/test, class prompts) -> CLIP-score filter
-> transductive filter -> materialise -> evaluate -> attribute -> report

:data:`STEPS` places the registry's stages (:mod:`pipeline.app.stages`) in a run directory:
each step's output directory and where its inputs come from. Each stage is called as a
function with its own config section, the same function its command runs. A stage whose
output is complete and made from the same inputs and settings is skipped; one made from
others is redone, and so, through their fingerprints, is every stage after it. ``--from`` /
``--to`` choose a range and ``--redo`` redoes named stages. Every source (metadata, task
images, model weights) is checked, and every config section built, before any stage starts;
a lock keeps two runs out of one run directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.app.registry import Call, as_dicts, resolve, run_call
from pipeline.app.settings import SubsetConfig
from pipeline.app.stages import STAGES
from pipeline.core import fingerprint, io
from pipeline.core.config import ConfigError, load_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """A run's settings and what it decides at its start: whether selection runs on
    precomputed embeddings first (``select_first``), whether their model is the run's
    (``served``: their vectors then serve selection and evaluation as they are) and whether
    the kept rows are downloaded."""

    s: SubsetConfig
    select_first: bool = False
    served: bool = False
    download: bool = True

    @property
    def folder_space(self) -> bool:
        """Selection over another model's vectors: text and task embeddings of that model."""
        return self.select_first and not self.served


@dataclass(frozen=True)
class Step:
    """A registry stage placed in a run directory: ``out`` relative to it; ``inputs`` name ->
    the step whose output it reads (or a function of the :class:`Run` giving that step, or
    ``subset.<field>`` for a source of the run such as the metadata); ``params`` fixed per-call
    parameters; ``enabled`` whether the run includes it; ``settings`` changes to the stage's
    config section for this step (a function of the whole config)."""

    name: str
    stage: str
    out: str
    inputs: dict[str, str | Callable[[Run], str | list[str]]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    enabled: Callable[[Run], bool] = lambda r: True
    settings: Callable[[dict[str, Any]], dict[str, Any]] | None = None


def folder_model(config: dict[str, Any]) -> dict[str, Any]:
    """The embed settings of the precomputed folder's model (its text and task embeddings)."""
    p = config["precomputed"]
    return {"model": p.model, "pretrained": p.pretrained or "none", "checkpoint": ""}


def served(config: dict[str, Any]) -> bool:
    """Whether the precomputed folder's model is the run's (``precomputed.model`` and
    ``pretrained`` equal ``embed``'s, no checkpoint)."""
    e, p = config["embed"], config["precomputed"]
    untrained = ("", "none")
    same_weights = p.pretrained == e.pretrained or (
        p.pretrained in untrained and e.pretrained in untrained
    )
    return bool(p.model) and p.model == e.model and same_weights and not e.checkpoint


def priming_step(r: Run) -> str:
    """The last filter's decision (or the whole pool when both filters are off)."""
    if r.s.transductive:
        return "transductive"
    if r.s.clip_filter:
        return "clip-filter"
    return "import-embeddings" if r.select_first else "embed-pool"


def priming_steps(r: Run) -> list[str]:
    """What evaluation scores, each under its protocol (read from the decision): zero-shot
    priming (the CLIP filter's decision, or the pool), and transductive priming when on."""
    zero_shot = "clip-filter" if r.s.clip_filter else _pool(r)
    return [zero_shot, "transductive"] if r.s.transductive else [zero_shot]


def _pool(r: Run) -> str:
    return "import-embeddings" if r.select_first else "embed-pool"


def _text(r: Run) -> str:
    return "embed-text-folder" if r.folder_space else "embed-text"


def _test(r: Run) -> str:
    return "embed-task-test-folder" if r.folder_space else "embed-task-test"


def _matches(r: Run) -> str:
    """The text matches as the run keeps them (after the caption sense filter, when on)."""
    return "caption-filter" if r.s.caption_filter else "filter"


def _downloads(r: Run) -> bool:
    return not r.select_first or r.download


STEPS: tuple[Step, ...] = (
    Step("filter", "filter", "matches", {"metadata": "subset.metadata"},
         enabled=lambda r: not r.select_first or "text" in r.s.candidates),
    Step("caption-filter", "caption-filter", "sense", {"matches": "filter"},
         enabled=lambda r: r.s.caption_filter and STEP["filter"].enabled(r)),
    Step("download", "download", "shards",
         {"matches": lambda r: "kept" if r.select_first else _matches(r)}, enabled=_downloads),
    Step("embed-pool", "embed-pool", "emb/pool", {"shards": "download"}, enabled=_downloads),
    Step("embed-task-train", "embed-task", "emb/task-train", params={"split": "train"}),
    Step("embed-task-test", "embed-task", "emb/task-test", params={"split": "test"}),
    Step("embed-text", "embed-text", "emb/text"),
    Step("embed-text-folder", "embed-text", "emb/text-folder",
         enabled=lambda r: r.folder_space, settings=folder_model),
    Step("embed-task-test-folder", "embed-task", "emb/task-test-folder",
         params={"split": "test"}, enabled=lambda r: r.folder_space, settings=folder_model),
    Step("knn-text", "knn-retrieve", "candidates/knn-text",
         {"source": "subset.embeddings", "queries": _text},
         enabled=lambda r: "knn-text" in r.s.candidates),
    Step("knn-image", "knn-retrieve", "candidates/knn-image",
         {"source": "subset.embeddings", "queries": _test},
         enabled=lambda r: "knn-image" in r.s.candidates),
    Step("candidates", "candidates", "candidates/all",
         {"text": _matches, "knn-text": "knn-text", "knn-image": "knn-image"},
         enabled=lambda r: r.select_first),
    Step("import-embeddings", "import-embeddings", "emb/imported",
         {"source": "subset.embeddings", "matches": "candidates"},
         enabled=lambda r: r.select_first),
    Step("clip-filter", "clip-filter", "decisions/clip", {"pool": _pool, "text": _text},
         enabled=lambda r: r.s.clip_filter),
    Step("transductive", "transductive", "decisions/transductive",
         {"pool": lambda r: "clip-filter" if r.s.clip_filter else _pool(r),
          "queries": _test, "text": _text},
         enabled=lambda r: r.s.transductive),
    Step("kept", "kept-candidates", "candidates/kept",
         {"candidates": "candidates", "decision": priming_step},
         enabled=lambda r: r.select_first and (r.s.clip_filter or r.s.transductive)),
    Step("materialise", "materialise", "subset", {"decision": priming_step, "shards": "download"},
         enabled=_downloads),
    Step("evaluate", "evaluate", "eval",
         {"train": "embed-task-train", "test": "embed-task-test", "text": "embed-text",
          "priming": lambda r: ["embed-pool"] if r.folder_space else priming_steps(r)}),
    Step("attribute", "attribute", "attribution",
         {"train": "embed-task-train", "text": "embed-text", "priming": priming_step,
          "matches": _matches},
         enabled=lambda r: r.s.attribute and not r.folder_space),
    Step("report", "report", "report"),
)  # fmt: skip
STEP = {s.name: s for s in STEPS}
STEP_NAMES = tuple(s.name for s in STEPS)
# The order of a run from metadata alone: download what the text filter found, then select.
TEXT_ORDER = (
    "filter", "caption-filter", "download", "embed-pool", "embed-task-train", "embed-task-test", "embed-text",
    "clip-filter", "transductive", "materialise", "evaluate", "attribute", "report",
)  # fmt: skip
# The order of a run that selects on precomputed embeddings before downloading.
SELECT_FIRST_ORDER = (
    "filter", "caption-filter", "embed-task-train", "embed-task-test", "embed-text", "embed-text-folder",
    "embed-task-test-folder", "knn-text", "knn-image", "candidates", "import-embeddings",
    "clip-filter", "transductive", "kept", "download", "embed-pool", "materialise", "evaluate",
    "attribute", "report",
)  # fmt: skip
# Where each step writes, relative to the run directory (the report reads it too).
STAGE_OUT = {s.name: s.out for s in STEPS}


def plan(config: dict[str, Any]) -> tuple[Run, list[Step]]:
    """The :class:`Run` of a config, and its steps in order."""
    s = config["subset"]
    if not s.select_first():
        return Run(s), [STEP[n] for n in TEXT_ORDER]
    serve = served(config)
    run = Run(s, True, serve, s.force_download or not serve)
    return run, [STEP[n] for n in SELECT_FIRST_ORDER]


@dataclass
class StageResult:
    name: str
    status: str  # ran, skipped, redone, disabled, not selected
    seconds: float = 0.0
    out: str = ""
    stats: dict = field(default_factory=dict)


class SourceError(RuntimeError):
    """A source the run needs is unreachable; the message says which and how to fix it."""


def run_dir_of(config: dict[str, Any]) -> str:
    """``subset.run_dir``, or ``<run.root>/<dataset name>``."""
    s = config["subset"]
    if not s.dataset:
        raise ConfigError("subset.dataset is required (DATASET=... or --dataset)")
    return s.run_dir or io.join(config["run"].root, load_dataset(s.dataset).name)


def check_sources(config: dict[str, Any], steps: list[str]) -> None:
    """Fail before any work when a source the chosen steps need is missing or unreachable.

    Raises :class:`SourceError` naming the source, what went wrong and the setting to fix.
    """
    s, embed = config["subset"], config["embed"]
    spec = load_dataset(s.dataset)
    metadata = metadata_of(config)
    if any(x in steps for x in ("import-embeddings", "knn-text", "knn-image")):
        if not config["precomputed"].model:
            raise SourceError(
                "precomputed embeddings need the model that made them: set precomputed.model "
                "(e.g. ViT-L-14) and precomputed.pretrained (e.g. openai)"
            )
        if not io.exists(s.embeddings):
            raise SourceError(
                f"precomputed embeddings: {s.embeddings!r} does not exist (--embeddings, "
                "subset.embeddings: the root holding img_emb/ and metadata/)"
            )
    if "filter" in steps:
        if not metadata:
            raise SourceError(
                "LAION metadata is required: the parquet URL, directory or glob (LAION=... or "
                "--metadata)"
            )
        if metadata.lower().endswith((".csv", ".tsv", ".json", ".jsonl")):
            raise SourceError(
                f"LAION metadata {metadata!r} is not parquet: the text filter reads parquet "
                "(convert with pyarrow: pyarrow.csv.read_csv(...) then pyarrow.parquet.write_table)"
            )
        try:
            files = io.list_files(metadata, suffixes=(".parquet",))
        except FileNotFoundError:
            raise SourceError(
                f"LAION metadata: no parquet files at {metadata!r}. Point LAION=... (or "
                "--metadata, subset.metadata) at a directory, glob or URL of LAION parquet files."
            ) from None
        except Exception as e:  # credentials, DNS, permissions: all say the same to the user
            raise SourceError(
                f"LAION metadata at {metadata!r} is unreachable ({type(e).__name__}: {e}). "
                "Check the URL, network access and credentials (AWS_* variables or "
                "io.storage_options)."
            ) from None
        log.info("metadata: %d parquet files at %s", len(files), metadata)
    if any(x.startswith("embed-task") for x in steps):
        if not s.data_root or not io.exists(s.data_root):
            raise SourceError(
                f"task images: {s.data_root!r} does not exist. Set DATA_ROOT=... (or --data-root) "
                f"to the {spec.name} dataset in the {spec.layout!r} layout (see README)."
            )
    if any(x.startswith("embed") for x in steps):
        from pipeline.embed.model import model_name

        try:
            model_name(embed.model)
        except io.InputError as e:
            raise SourceError(f"model: {e}") from None
        if embed.checkpoint:
            if not io.exists(embed.checkpoint):
                raise SourceError(
                    f"model weights: checkpoint {embed.checkpoint!r} does not exist "
                    "(CHECKPOINT=... / --checkpoint)"
                )
        elif embed.weights() == "pretrained" and not embed.model.startswith(("hf-hub:", "local")):
            _check_pretrained(embed.model, embed.pretrained)


def _check_pretrained(model: str, tag: str) -> None:
    """An open_clip tag must exist, and be cached when the machine is offline."""
    from pipeline.core.torchcompat import import_open_clip

    open_clip = import_open_clip()
    pretrained_cfg = open_clip.get_pretrained_cfg(model, tag)
    if not pretrained_cfg:
        known = [t for m, t in open_clip.list_pretrained() if m == model]
        raise SourceError(
            f"model weights: open_clip has no pretrained tag {tag!r} for {model!r} (known: {known})"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
        "PRIMER_OFFLINE", ""
    ) not in ("", "0")
    if offline:
        hub_id = pretrained_cfg.get("hf_hub", "")
        cached = False
        if hub_id:
            try:
                from huggingface_hub import try_to_load_from_cache

                repo = hub_id.rstrip("/")
                for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
                    if isinstance(try_to_load_from_cache(repo, fname), str):
                        cached = True
            except ImportError:
                cached = False
        if not cached:
            raise SourceError(
                f"model weights: {model}/{tag} is not in the local cache and this machine is "
                "offline (HF_HUB_OFFLINE=1). Download it on a networked machine (open_clip."
                f"create_model_and_transforms({model!r}, pretrained={tag!r})) and copy the "
                "Hugging Face cache, or pass CHECKPOINT=/path/model.pt, or PRETRAINED=none for "
                "untrained weights."
            )


def parse_steps(values: list[str] | None) -> list[str]:
    """Step names from ``--redo`` values (comma lists, repeatable; ``all``)."""
    out = []
    for v in values or []:
        for name in v.split(","):
            name = name.strip()
            if not name:
                continue
            if name == "all":
                out.extend(STEP_NAMES)
            elif name not in STEP_NAMES:
                raise ConfigError(f"unknown stage {name!r} (stages: {', '.join(STEP_NAMES)})")
            else:
                out.append(name)
    return out


def select_steps(
    from_step: str | None, to_step: str | None, order: list[str] | None = None
) -> list[str]:
    names = list(order or STEP_NAMES)
    for s in (from_step, to_step):
        if s and s not in names:
            raise ConfigError(f"unknown stage {s!r} (stages: {', '.join(names)})")
    start = names.index(from_step) if from_step else 0
    end = names.index(to_step) if to_step else len(names) - 1
    if start > end:
        raise ConfigError(f"--from {from_step} comes after --to {to_step}")
    return names[start : end + 1]


def step_call(
    step: Step, config: dict[str, Any], run_dir: str, overwrite: bool, run: Run | None = None
) -> Call:
    """The :class:`Call` of a step: its stage's config section, its inputs under ``run_dir``
    (an input from a step the run leaves out is left out)."""
    run = run or plan(config)[0]
    s = run.s
    stage = STAGES[step.stage]
    inputs = {}
    for name, source in step.inputs.items():
        src = source(run) if callable(source) else source
        if isinstance(src, list):  # several steps' outputs (those the run includes)
            inputs[name] = [io.join(run_dir, STAGE_OUT[x]) for x in src if STEP[x].enabled(run)]
        elif src.startswith("subset."):  # a source of the run, not another step's output
            inputs[name] = (
                metadata_of(config)
                if src == "subset.metadata"
                else getattr(s, src[len("subset.") :])
            )
        elif STEP[src].enabled(run):
            inputs[name] = io.join(run_dir, STAGE_OUT[src])
    params = {"dataset": s.dataset, "data_root": s.data_root, **step.params}
    if step.stage == "report":
        params = {"run_dir": run_dir}
    cfg = config[stage.section] if stage.section else None
    if step.settings is not None:
        cfg = replace(cfg, **step.settings(config))
    out = io.join(run_dir, step.out)
    return Call(stage, cfg, config, inputs, out, params, overwrite)


def metadata_of(config: dict[str, Any]) -> str:
    """``subset.metadata``; with precomputed embeddings and no metadata given, the folder's own
    metadata files (so every match knows its row in the folder)."""
    s = config["subset"]
    if s.metadata or not s.select_first():
        return s.metadata
    return io.join(s.embeddings, config["precomputed"].meta_glob)


def _state(out: str) -> tuple[bool, str | None]:
    stored = fingerprint.stored(out)
    return io.is_done(out), (stored or {}).get("run")


def run_subset(
    config: dict[str, Any],
    from_step: str | None = None,
    to_step: str | None = None,
    redo: list[str] | None = None,
) -> list[StageResult]:
    """Run the pipeline with a resolved config (:func:`pipeline.app.registry.resolve`); one
    :class:`StageResult` per step, in order.

    Raises :class:`SourceError` before any work when a source is unreachable,
    :class:`pipeline.core.io.LockedError` when another run holds the run directory, and the
    failing stage's error (its completed predecessors stay).
    """
    run_dir = run_dir_of(config)
    run, order = plan(config)
    steps = select_steps(from_step, to_step, [x.name for x in order])
    again = set(parse_steps(redo))
    check_sources(config, [x.name for x in order if x.name in steps and x.enabled(run)])
    results: list[StageResult] = []
    with io.RunLock(run_dir):
        io.write_json(io.join(run_dir, "config.json"), as_dicts(config))
        for step in order:
            out = io.join(run_dir, step.out)
            if step.name not in steps:
                results.append(StageResult(step.name, "not selected", out=out))
                continue
            if not step.enabled(run):
                results.append(StageResult(step.name, "disabled", out=out))
                continue
            changed = any(r.status in ("ran", "redone") for r in results)
            if step.stage == "report" and not changed and step.name not in again:
                if io.exists(io.join(out, "index.html")):  # nothing new to show
                    results.append(StageResult(step.name, "skipped", out=out))
                    continue
            results.append(_run_step(step, config, run_dir, step.name in again, run))
    return results


def _run_step(
    step: Step, config: dict[str, Any], run_dir: str, redo: bool, run: Run
) -> StageResult:
    call = step_call(step, config, run_dir, redo, run)
    before = _state(call.out)
    log.info("[%s] %s -> %s", step.name, step.stage, call.out)
    t0 = time.perf_counter()
    status = "ran"
    try:
        stats = run_call(call)
    except fingerprint.StaleOutputError as e:
        log.warning("[%s] %s; redoing it and the stages after it", step.name, e)
        stats = run_call(replace(call, overwrite=True))
        status = "redone"
    except Exception as e:
        raise RuntimeError(
            f"stage {step.name!r} failed ({type(e).__name__}: {e}); fix the cause and rerun: "
            "completed stages are kept"
        ) from e
    seconds = time.perf_counter() - t0
    if step.stage != "report" and not redo and before[0] and _state(call.out) == before:
        status = "skipped"
    return StageResult(step.name, status, seconds, call.out, _stats(call.out, stats))


def _stats(out: str, returned: dict) -> dict:
    """A stage's stats (the text filter's are ``_stats.json``, beside its parquet dataset)."""
    for name in ("stats.json", "_stats.json"):
        try:
            return io.read_json(io.join(out, name))
        except (FileNotFoundError, OSError, ValueError):
            continue
    return returned or {}


def _headline(stats: dict) -> str:
    """A few numbers from a stage's stats.json for the summary line."""
    keys = (
        "rows_scanned", "rows_matched", "matched", "success", "succeeded", "failed", "rows",
        "embedded", "kept", "dropped", "written", "samples",
    )  # fmt: skip
    keys += ("imported", "candidates", "downloads_avoided", "urls")
    parts = [f"{k}={stats[k]}" for k in keys if isinstance(stats.get(k), (int, float))]
    return ", ".join(parts[:4])


def downloads_avoided(results: list[StageResult]) -> tuple[int, int] | None:
    """``(downloads avoided, candidates)`` of a run that selected before downloading: every
    candidate when nothing was downloaded, else those the selection dropped."""
    by = {r.name: r for r in results}
    kept = by.get("kept")
    if kept is None or not kept.stats:
        return None
    downloaded = by.get("download")
    fetched = kept.stats["kept"] if downloaded and downloaded.status != "disabled" else 0
    return kept.stats["candidates"] - fetched, kept.stats["candidates"]


def summary(results: list[StageResult], run_dir: str) -> str:
    """The one-screen summary printed at the end of ``primer subset``."""
    lines = [f"Primer run: {run_dir}", "", f"{'stage':<18}{'status':<14}{'time':>9}  counts"]
    for r in results:
        t = f"{r.seconds:8.1f}s" if r.status in ("ran", "redone") else ""
        lines.append(f"{r.name:<18}{r.status:<14}{t:>9}  {_headline(r.stats)}")
    avoided = downloads_avoided(results)
    if avoided is not None:
        lines += ["", f"Downloads avoided: {avoided[0]} of {avoided[1]} candidates (selected on "
                  "precomputed embeddings before downloading)"]  # fmt: skip
    results_md = io.join(run_dir, STAGE_OUT["evaluate"], "results.md")
    if io.exists(results_md):
        lines += ["", io.read_bytes(results_md).decode("utf-8").strip()]
    lines += ["", "Outputs:"]
    for r in results:
        if r.status in ("ran", "skipped", "redone"):
            lines.append(f"  {r.name:<18}{r.out}")
    report = io.join(run_dir, STAGE_OUT["report"], "index.html")
    if io.exists(report):
        lines += ["", f"Report: {report}"]
    return "\n".join(lines) + "\n"


# Command-line options of `primer subset` and the settings they stand for.
SUBSET_OPTIONS = (
    ("--dataset", "subset.dataset", "bundled dataset name or path.yaml"),
    ("--metadata", "subset.metadata", "LAION parquet URL, directory or glob"),
    ("--data-root", "subset.data_root", "the target task's images"),
    ("--run-dir", "subset.run_dir", "run directory (default <run.root>/<dataset>)"),
    ("--model", "embed.model", "open_clip model name"),
    ("--pretrained", "embed.pretrained", "open_clip pretrained tag, or none (untrained)"),
    ("--checkpoint", "embed.checkpoint", "a local checkpoint (state dict) instead of a tag"),
    ("--device", "embed.device", "auto | cpu | cuda | cuda:N"),
    ("--master", "spark.master", "Spark master for the Spark stages (default local[*])"),
    ("--embeddings", "subset.embeddings", "precomputed embeddings (img_emb/ + metadata/)"),
    ("--candidates", "subset.candidates", "candidate sources: text, knn-text, knn-image"),
)


def add_subset_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.app.registry import default_of

    for flag, key, text in SUBSET_OPTIONS:
        p.add_argument(
            flag, dest=key.replace(".", "__"), help=f"{text} (config key {key}; default "
            f"{default_of(key)!r})",
        )  # fmt: skip
    p.add_argument("--from", dest="from_step", metavar="STAGE", help="first stage to run")
    p.add_argument("--to", dest="to_step", metavar="STAGE", help="last stage to run")
    add_redo_option(p)


def add_redo_option(p) -> None:
    """``--redo STAGE`` (``--overwrite`` its earlier spelling), for ``subset`` and ``demo``."""
    p.add_argument(
        "--redo",
        "--overwrite",
        dest="redo",
        action="append",
        metavar="STAGE",
        help="redo these stages even if complete (comma list or repeat; 'all'; --overwrite is "
        f"the earlier spelling). Stages: {', '.join(STEP_NAMES)}",
    )


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "subset",
        parents=[common],
        help="run every stage for one dataset under one run directory",
        description=__doc__.split("\n\n")[0],
    )
    add_subset_arguments(p)
    p.set_defaults(func=_cmd_subset)


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Every config section of a ``primer subset`` command line, built and checked."""
    settings = {key: getattr(args, key.replace(".", "__"), None) for _, key, _ in SUBSET_OPTIONS}
    return resolve(args.config, args.overrides, settings)


def _cmd_subset(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        results = run_subset(config, args.from_step, args.to_step, args.redo)
    except (SourceError, io.LockedError, RuntimeError) as e:
        log.error("%s", e)
        return 1
    sys.stdout.write(summary(results, run_dir_of(config)))
    return 0
