"""The embed stages' command line: ``primer embed`` (pool shards, :mod:`pipeline.embed.pool`),
``primer embed-task`` (target-task images, :mod:`pipeline.embed.task`) and ``primer embed-text``
(class prompts, :mod:`pipeline.embed.text`)."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.core.config import stage_config
from pipeline.embed.config import EmbedConfig
from pipeline.embed.pool import embed_shards
from pipeline.embed.task import embed_task
from pipeline.embed.text import embed_text


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="open_clip model name (default from config: ViT-B-16)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--pretrained", help="open_clip tag, or 'none' for untrained seeded weights")
    w.add_argument("--checkpoint", help="state dict file or URL (torch.load weights_only=True)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--workers", type=int, help="DataLoader worker processes decoding images")
    p.add_argument("--seed", type=int, help="seed of untrained weights (--pretrained none)")
    p.add_argument("--out", required=True, help="output directory URL")
    p.add_argument("--overwrite", action="store_true", help="redo a complete output")


def cfg_from_args(args: argparse.Namespace) -> EmbedConfig:
    """The :class:`EmbedConfig` of a parsed ``embed*`` command line."""
    keys = ("model", "pretrained", "checkpoint", "device", "precision", "batch_size", "workers")
    flags = {k: getattr(args, k, None) for k in (*keys, "seed")}
    if flags.get("checkpoint"):
        flags["pretrained"] = ""
    return stage_config(EmbedConfig, "embed", args.config, args.overrides, flags)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "embed",
        parents=[common],
        help="stage 3: embed webdataset shards with open_clip",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--shards", required=True, help="directory URL of webdataset .tar shards")
    p.add_argument("--rank", type=int, help="this process's rank (default $RANK or 0)")
    p.add_argument("--world-size", dest="world_size", type=int, help="default $WORLD_SIZE or 1")
    _model_flags(p)
    p.set_defaults(
        func=lambda a: _report(
            embed_shards(cfg_from_args(a), a.shards, a.out, a.overwrite, a.rank, a.world_size),
            a.out,
        )
    )

    p = sub.add_parser(
        "embed-task", parents=[common], help="stage 3: embed a target task's train or test images"
    )
    p.add_argument("--dataset", required=True, help="bundled dataset name or path.yaml")
    p.add_argument("--split", required=True, choices=["train", "test"])
    p.add_argument("--root", required=True, help="directory holding the dataset's images")
    p.add_argument("--layout", help="override the dataset config's layout (imagefolder, ...)")
    p.add_argument(
        "--download",
        action="store_true",
        help="let torchvision download the dataset into --root first (needs network)",
    )
    _model_flags(p)
    p.set_defaults(
        func=lambda a: _report(
            embed_task(
                cfg_from_args(a),
                a.dataset,
                a.split,
                a.root,
                a.out,
                a.layout,
                a.overwrite,
                a.download,
            ),
            a.out,
        )
    )

    p = sub.add_parser(
        "embed-text",
        parents=[common],
        help="stage 3: embed every class prompt (templates and descriptions)",
    )
    p.add_argument("--dataset", required=True, help="bundled dataset name or path.yaml")
    _model_flags(p)
    p.set_defaults(
        func=lambda a: _report(embed_text(cfg_from_args(a), a.dataset, a.out, a.overwrite), a.out)
    )


def _report(stats: dict, out: str) -> int:
    brief = {k: v for k, v in stats.items() if k != "failures"}
    sys.stdout.write(f"{json.dumps(brief, default=str)} -> {out}\n")
    return 0
