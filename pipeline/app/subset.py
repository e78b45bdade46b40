"""``primer subset``: every stage, in order, under one run directory.

text filter -> download -> embed (pool, task train/test, class prompts) -> CLIP-score filter
-> transductive filter -> materialise -> evaluate -> report

Each stage runs through its own ``primer`` subcommand in this process (the same code path as
running the commands by hand), reading the previous stage's output under the run directory
(layout in docs/architecture.md and :data:`pipeline.report.page.LAYOUT`). A stage whose output
holds ``_SUCCESS`` is skipped; ``--from``/``--to`` choose a range and ``--overwrite`` redoes
named stages. Every source (metadata, task images, model weights) is checked before any
stage starts, and a lock keeps two runs out of one run directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.core import io
from pipeline.core.config import ConfigError, load_config, load_dataset, stage_config, to_dict
from pipeline.report.page import LAYOUT

log = logging.getLogger(__name__)

STAGES = (
    "filter",
    "download",
    "embed-pool",
    "embed-task-train",
    "embed-task-test",
    "embed-text",
    "clip-filter",
    "transductive",
    "materialise",
    "evaluate",
    "report",
)

# Where each stage writes, relative to the run directory.
STAGE_OUT = {
    "filter": LAYOUT["matches"],
    "download": LAYOUT["shards"],
    "embed-pool": LAYOUT["pool"],
    "embed-task-train": LAYOUT["task_train"],
    "embed-task-test": LAYOUT["task_test"],
    "embed-text": LAYOUT["text"],
    "clip-filter": LAYOUT["clip"],
    "transductive": LAYOUT["transductive"],
    "materialise": LAYOUT["subset"],
    "evaluate": LAYOUT["eval"],
    "report": LAYOUT["report"],
}


@dataclass(frozen=True)
class SubsetConfig:
    """Settings of ``primer subset`` (section ``subset``); the stages read their own sections.

    ``metadata``: LAION parquet URL or glob. ``data_root``: the target task's images (the layout
    named by the dataset config). ``model``/``pretrained``/``checkpoint``: open_clip weights
    (``pretrained: none`` for untrained, seeded weights). ``run_dir`` defaults to
    ``<run.root>/<dataset>``.
    """

    dataset: str = ""
    metadata: str = ""
    data_root: str = ""
    run_dir: str = ""
    model: str = "ViT-B-16"
    pretrained: str = "laion2b_s34b_b88k"
    checkpoint: str = ""
    device: str = "auto"
    master: str = ""
    clip_filter: bool = True
    min_prob: float = 0.0
    require_agreement: bool = True
    transductive: bool = True
    k: int = 10
    materialise_format: str = "webdataset"
    shots: str = "0,1,2,5,10"
    seeds: int = 3
    alpha: str = "auto"
    head: str = "centroid"

    def __post_init__(self) -> None:
        problems = []
        if not self.dataset:
            problems.append("dataset is required (DATASET=... or --dataset)")
        if not self.metadata:
            problems.append(
                "metadata is required: the LAION parquet URL or glob (LAION=... or --metadata)"
            )
        if not self.data_root:
            problems.append(
                "data_root is required: the target task's images (DATA_ROOT=... or --data-root)"
            )
        if self.checkpoint and self.pretrained not in ("", "none"):
            problems.append(
                "give either pretrained or checkpoint, not both (set pretrained to '' with a checkpoint)"
            )
        if self.materialise_format not in ("webdataset", "imagefolder"):
            problems.append("materialise_format must be webdataset or imagefolder")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class StageResult:
    name: str
    status: str  # ran, skipped, disabled, failed
    seconds: float = 0.0
    out: str = ""
    stats: dict = field(default_factory=dict)


class SourceError(RuntimeError):
    """A source the run needs is unreachable; the message says which and how to fix it."""


def _model_args(cfg: SubsetConfig) -> list[str]:
    args = ["--model", cfg.model, "--device", cfg.device]
    if cfg.checkpoint:
        args += ["--checkpoint", cfg.checkpoint]
    else:
        args += ["--pretrained", cfg.pretrained or "none"]
    return args


def stage_argv(name: str, cfg: SubsetConfig, run_dir: str, common: list[str]) -> list[str] | None:
    """The ``primer`` command line of stage ``name``; ``None`` when the config disables it."""
    out = io.join(run_dir, STAGE_OUT[name])
    p = {k: io.join(run_dir, v) for k, v in LAYOUT.items()}
    if name == "filter":
        argv = ["filter", "--dataset", cfg.dataset, "--metadata", cfg.metadata, "--out", out]
        if cfg.master:
            argv += ["--master", cfg.master]
    elif name == "download":
        argv = ["download", "--matches", p["matches"], "--out", out]
    elif name == "embed-pool":
        argv = ["embed", "--shards", p["shards"], "--out", out, *_model_args(cfg)]
    elif name in ("embed-task-train", "embed-task-test"):
        split = name.rsplit("-", 1)[1]
        argv = [
            "embed-task",
            "--dataset",
            cfg.dataset,
            "--split",
            split,
            "--root",
            cfg.data_root,
            "--out",
            out,
            *_model_args(cfg),
        ]
    elif name == "embed-text":
        argv = ["embed-text", "--dataset", cfg.dataset, "--out", out, *_model_args(cfg)]
    elif name == "clip-filter":
        if not cfg.clip_filter:
            return None
        argv = [
            "clip-filter",
            "--pool",
            p["pool"],
            "--text",
            p["text"],
            "--out",
            out,
            "--min-prob",
            str(cfg.min_prob),
        ]
        if cfg.require_agreement:
            argv.append("--require-agreement")
    elif name == "transductive":
        if not cfg.transductive:
            return None
        pool = p["clip"] if cfg.clip_filter else p["pool"]
        argv = [
            "transductive",
            "--pool",
            pool,
            "--queries",
            p["task_test"],
            "--text",
            p["text"],
            "--k",
            str(cfg.k),
            "--out",
            out,
        ]
    elif name == "materialise":
        argv = [
            "materialise",
            "--decision",
            priming_source(cfg, run_dir),
            "--shards",
            p["shards"],
            "--out",
            out,
            "--format",
            cfg.materialise_format,
        ]
    elif name == "evaluate":
        argv = [
            "evaluate", "--dataset", cfg.dataset, "--task-train", p["task_train"], "--task-test", p["task_test"],
            "--text", p["text"], "--shots", cfg.shots,
            "--seeds", str(cfg.seeds), "--alpha", cfg.alpha, "--head", cfg.head, "--out", out,
        ]  # fmt: skip
        for source in evaluate_sources(cfg, run_dir):  # each decision names its protocol
            argv += ["--priming", source]
    elif name == "report":
        return ["report", run_dir]
    else:  # pragma: no cover - STAGES is closed
        raise KeyError(name)
    return argv + common


def priming_source(cfg: SubsetConfig, run_dir: str) -> str:
    """The last filter's decision (or the whole pool when both filters are off)."""
    if cfg.transductive:
        return io.join(run_dir, LAYOUT["transductive"])
    if cfg.clip_filter:
        return io.join(run_dir, LAYOUT["clip"])
    return io.join(run_dir, LAYOUT["pool"])


def evaluate_sources(cfg: SubsetConfig, run_dir: str) -> list[str]:
    """What the evaluation primes with: the CLIP filter's decision (zero-shot priming: no test
    image; the pool when the filter is off) and the transductive decision when it runs."""
    zero_shot = LAYOUT["clip"] if cfg.clip_filter else LAYOUT["pool"]
    sources = [io.join(run_dir, zero_shot)]
    if cfg.transductive:
        sources.append(io.join(run_dir, LAYOUT["transductive"]))
    return sources


def check_sources(cfg: SubsetConfig, stages: list[str]) -> None:
    """Fail before any work when a source the chosen stages need is unreachable.

    Raises :class:`SourceError` naming the source, what went wrong and the setting to fix.
    """
    spec = load_dataset(cfg.dataset)
    if "filter" in stages:
        try:
            files = io.list_files(cfg.metadata, suffixes=(".parquet",))
        except FileNotFoundError:
            raise SourceError(
                f"LAION metadata: no parquet files at {cfg.metadata!r}. Point LAION=... (or --metadata, "
                "subset.metadata) at a directory, glob or URL of LAION parquet files."
            ) from None
        except Exception as e:  # credentials, DNS, permissions: all say the same to the user
            raise SourceError(
                f"LAION metadata at {cfg.metadata!r} is unreachable ({type(e).__name__}: {e}). "
                "Check the URL, network access and credentials (AWS_* variables or io.storage_options)."
            ) from None
        log.info("metadata: %d parquet files at %s", len(files), cfg.metadata)
    if any(s.startswith("embed-task") for s in stages):
        if not io.exists(cfg.data_root):
            raise SourceError(
                f"task images: {cfg.data_root!r} does not exist. Set DATA_ROOT=... (or --data-root) to the "
                f"{spec.name} dataset in the {spec.layout!r} layout (see README, 'Real runs')."
            )
    if any(s.startswith("embed") for s in stages):
        if cfg.checkpoint:
            if not io.exists(cfg.checkpoint):
                raise SourceError(
                    f"model weights: checkpoint {cfg.checkpoint!r} does not exist (CHECKPOINT=... / --checkpoint)"
                )
        elif cfg.pretrained and cfg.pretrained != "none":
            _check_pretrained(cfg.model, cfg.pretrained)


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
                f"model weights: {model}/{tag} is not in the local cache and this machine is offline "
                "(HF_HUB_OFFLINE=1). Download it on a networked machine (open_clip.create_model_and_transforms"
                f"({model!r}, pretrained={tag!r})) and copy the Hugging Face cache, or pass CHECKPOINT=/path/model.pt, "
                "or use PRETRAINED=none for untrained weights."
            )


def _parse_stage_list(values: list[str] | None) -> list[str]:
    out = []
    for v in values or []:
        for name in v.split(","):
            name = name.strip()
            if not name:
                continue
            if name == "all":
                out.extend(STAGES)
            elif name not in STAGES:
                raise ConfigError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})")
            else:
                out.append(name)
    return out


def select_stages(from_stage: str | None, to_stage: str | None) -> list[str]:
    names = list(STAGES)
    for s in (from_stage, to_stage):
        if s and s not in STAGES:
            raise ConfigError(f"unknown stage {s!r} (stages: {', '.join(STAGES)})")
    start = names.index(from_stage) if from_stage else 0
    end = names.index(to_stage) if to_stage else len(names) - 1
    if start > end:
        raise ConfigError(f"--from {from_stage} comes after --to {to_stage}")
    return names[start : end + 1]


def run_subset(
    cfg: SubsetConfig,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    from_stage: str | None = None,
    to_stage: str | None = None,
    overwrite: list[str] | None = None,
    run_stage: Callable[[list[str]], int] | None = None,
) -> list[StageResult]:
    """Run the pipeline; returns one :class:`StageResult` per stage in order.

    ``run_stage(argv) -> exit code`` runs one ``primer`` command (default: in-process
    :func:`pipeline.app.cli.main`). Raises :class:`SourceError` before any work when a source is
    unreachable, :class:`pipeline.core.io.LockedError` when another run holds the run directory, and
    ``RuntimeError`` naming the stage when a stage fails (its completed predecessors stay).
    """
    from pipeline.app.cli import main as cli_main

    run_stage = run_stage or cli_main
    root = load_config(config_file, overrides or []).get("run", {}).get("root", "data")
    run_dir = cfg.run_dir or io.join(str(root), load_dataset(cfg.dataset).name)
    stages = select_stages(from_stage, to_stage)
    redo = set(_parse_stage_list(overwrite))
    check_sources(cfg, stages)
    common: list[str] = []
    if config_file:
        common += ["--config", config_file]
    for o in overrides or []:
        common += ["--set", o]
    results: list[StageResult] = []
    with io.RunLock(run_dir):
        io.write_json(
            io.join(run_dir, "config.json"),
            {"subset": to_dict(cfg), **load_config(config_file, overrides or [])},
        )
        for name in STAGES:
            out = io.join(run_dir, STAGE_OUT[name])
            if name not in stages:
                results.append(StageResult(name, "not selected", out=out))
                continue
            argv = stage_argv(name, cfg, run_dir, common)
            if argv is None:
                results.append(StageResult(name, "disabled", out=out))
                continue
            done = io.exists(out) if name == "report" else io.is_done(out)
            if done and name not in redo:
                log.info("[%s] complete at %s; skipping (--overwrite %s to redo)", name, out, name)
                results.append(StageResult(name, "skipped", out=out, stats=_stats(out)))
                continue
            if name in redo and name != "report":
                argv = argv + ["--overwrite"]
            log.info("[%s] primer %s", name, " ".join(argv))
            t0 = time.perf_counter()
            code = run_stage(argv)
            seconds = time.perf_counter() - t0
            if code != 0:
                results.append(StageResult(name, "failed", seconds, out))
                raise RuntimeError(
                    f"stage {name!r} failed (exit code {code}); fix the cause and rerun: completed stages are kept"
                )
            results.append(StageResult(name, "ran", seconds, out, _stats(out)))
    return results


def _stats(out: str) -> dict:
    """A stage's stats (the text filter's are ``_stats.json``, beside its parquet dataset)."""
    for name in ("stats.json", "_stats.json"):
        try:
            return io.read_json(io.join(out, name))
        except (FileNotFoundError, OSError, ValueError):
            continue
    return {}


def _headline(stats: dict) -> str:
    """A few numbers from a stage's stats.json for the summary line."""
    keys = (
        "rows_scanned",
        "rows_matched",
        "matched",
        "success",
        "succeeded",
        "failed",
        "rows",
        "embedded",
        "kept",
        "dropped",
        "written",
        "samples",
    )
    parts = [f"{k}={stats[k]}" for k in keys if isinstance(stats.get(k), (int, float))]
    return ", ".join(parts[:4])


def summary(results: list[StageResult], run_dir: str) -> str:
    """The one-screen summary printed at the end of ``primer subset``."""
    lines = [f"Primer run: {run_dir}", "", f"{'stage':<18}{'status':<14}{'time':>9}  counts"]
    for r in results:
        t = f"{r.seconds:8.1f}s" if r.status == "ran" else ""
        lines.append(f"{r.name:<18}{r.status:<14}{t:>9}  {_headline(r.stats)}")
    results_md = io.join(run_dir, LAYOUT["eval"], "results.md")
    if io.exists(results_md):
        lines += ["", io.read_bytes(results_md).decode("utf-8").strip()]
    lines += ["", "Outputs:"]
    for r in results:
        if r.status in ("ran", "skipped"):
            lines.append(f"  {r.name:<18}{r.out}")
    report = io.join(run_dir, LAYOUT["report"], "index.html")
    if io.exists(report):
        lines += ["", f"Report: {report}"]
    return "\n".join(lines) + "\n"


def add_subset_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", help="bundled dataset name or path.yaml")
    p.add_argument("--metadata", help="LAION parquet URL, directory or glob")
    p.add_argument("--data-root", dest="data_root", help="the target task's images")
    p.add_argument("--run-dir", dest="run_dir", help="run directory (default <run.root>/<dataset>)")
    p.add_argument("--model", help="open_clip model name (default ViT-B-16)")
    p.add_argument(
        "--pretrained", help="open_clip pretrained tag, or 'none' for untrained seeded weights"
    )
    p.add_argument(
        "--checkpoint", help="a local checkpoint (state dict) instead of a pretrained tag"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--master", help="Spark master for the text filter (default local[*])")
    p.add_argument(
        "--from",
        dest="from_stage",
        metavar="STAGE",
        help=f"first stage to run ({', '.join(STAGES)})",
    )
    p.add_argument("--to", dest="to_stage", metavar="STAGE", help="last stage to run")
    p.add_argument(
        "--overwrite",
        action="append",
        metavar="STAGE",
        help="redo these stages even if complete (comma list or repeat; 'all')",
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


def config_from_args(args: argparse.Namespace) -> SubsetConfig:
    flags = {
        k: getattr(args, k, None)
        for k in (
            "dataset",
            "metadata",
            "data_root",
            "run_dir",
            "model",
            "pretrained",
            "checkpoint",
            "device",
            "master",
        )
    }
    if flags.get("checkpoint") and not flags.get("pretrained"):
        flags["pretrained"] = ""
    return stage_config(SubsetConfig, "subset", args.config, args.overrides, flags)


def _cmd_subset(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    run_dir = cfg.run_dir or io.join(
        str(load_config(args.config, args.overrides).get("run", {}).get("root", "data")),
        load_dataset(cfg.dataset).name,
    )
    cfg = SubsetConfig(**{**to_dict(cfg), "run_dir": run_dir})
    try:
        results = run_subset(
            cfg, args.config, args.overrides, args.from_stage, args.to_stage, args.overwrite
        )
    except (SourceError, io.LockedError, RuntimeError) as e:
        log.error("%s", e)
        return 1
    sys.stdout.write(summary(results, run_dir))
    return 0
