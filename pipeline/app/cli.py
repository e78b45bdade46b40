"""The ``primer`` command line.

Each stage module owns its subcommand: it exposes ``register(subparsers, common)`` that adds
a parser whose ``func(args) -> int`` runs the stage. This file only lists the modules, so
``primer --help`` stays fast (stage modules import their heavy engines inside functions).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline.core import io
from pipeline.core.config import ConfigError, load_config, load_dataset

log = logging.getLogger("primer")

# Stage modules, in pipeline order. Each defines register(subparsers, common).
COMMAND_MODULES: list[str] = [
    "pipeline.app.cli",  # classes, config (below)
    "pipeline.text_filter.stage",
    "pipeline.caption_filter.stage",
    "pipeline.download.stage",
    "pipeline.embed.stage",
    "pipeline.select.filters",
    "pipeline.materialise",
    "pipeline.evaluate.stage",
    "pipeline.app.subset",
    "pipeline.demo.run",
    "pipeline.report.page",
]


def common_parser() -> argparse.ArgumentParser:
    """Options every subcommand accepts."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("configuration")
    g.add_argument("--config", metavar="FILE", help="a YAML file layered over conf/default.yaml")
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set filter.max_per_class=1000 (repeatable)",
    )
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "classes",
        parents=[common],
        help="print a dataset's class names (one per line, in label order)",
        description="Print a dataset's class names in label order. DATASET is a bundled name "
        "(see --list) or the path of a YAML file.",
    )
    p.add_argument(
        "dataset", nargs="?", help="bundled name (StanfordCars, ImageNet-R, ...) or path.yaml"
    )
    p.add_argument(
        "--prompts", action="store_true", help="print every prompt (template x class) instead"
    )
    p.add_argument("--list", action="store_true", help="list the bundled datasets")
    p.set_defaults(func=_cmd_classes)

    p = sub.add_parser(
        "config",
        parents=[common],
        help="print the resolved configuration as YAML",
        description="Print the configuration after layering conf/default.yaml, --config FILE and --set overrides.",
    )
    p.add_argument("--section", help="print only this section")
    p.set_defaults(func=_cmd_config)


def _cmd_classes(args: argparse.Namespace) -> int:
    from pipeline.core.config import list_datasets

    if args.list or not args.dataset:
        for name in list_datasets():
            spec = load_dataset(name)
            print(f"{name}\t{spec.num_classes}")
        return 0
    spec = load_dataset(args.dataset)
    out = sys.stdout
    for i, name in enumerate(spec.classes):
        if args.prompts:
            for prompt in spec.prompts(i):
                out.write(f"{i}\t{prompt}\n")
        else:
            out.write(f"{name}\n")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    cfg = load_config(args.config, args.overrides)
    if args.section:
        if args.section not in cfg:
            raise ConfigError(f"no section {args.section!r} (sections: {', '.join(sorted(cfg))})")
        cfg = {args.section: cfg[args.section]}
    sys.stdout.write(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = common_parser()
    parser = argparse.ArgumentParser(
        prog="primer",
        description="Build and evaluate Neural Priming subsets from LAION-scale metadata.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in COMMAND_MODULES:
        mod = importlib.import_module(mod_name)
        mod.register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    io.setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        log.error("configuration error: %s", e)
        return 2
    except (io.InputError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
