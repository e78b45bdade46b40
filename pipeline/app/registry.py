"""The stage registry's machinery: how a stage is declared, configured and called.

A :class:`Stage` is declared once (in :mod:`pipeline.app.stages`): its name (the ``primer``
command), the config section it reads, its inputs and its command-line options, and the
function that runs it on a :class:`Call`. The command line and ``primer subset`` both build a
``Call`` (resolved config, input and output URLs, per-call parameters) and hand it to that
function: no stage is ever reached by building an argv string for another parser.

Configuration is resolved once per command (``conf/`` defaults, ``--config FILE``, ``--set``,
then the command's own options, which are shorthands for config keys) and every section is
checked against its dataclass before anything runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.core import io
from pipeline.core.config import ConfigError, check_sections, load_config, parse_set

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Option:
    """One command-line option of a stage.

    ``to`` says where its value goes: ``"section.key"`` (a shorthand for ``--set section.key=V``),
    ``"input:NAME"`` (an input URL), ``"param:NAME"`` (a per-call parameter) or ``"out"``.
    ``kwargs`` are argparse's (``type``, ``choices``, ``action``, ``required``, ...).
    """

    flags: tuple[str, ...]
    to: str
    help: str = ""
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """A stage as the CLI and ``primer subset`` know it.

    ``run`` is ``"module:function"``, a function of a :class:`Call` returning the stage's stats
    (imported when the stage runs, so ``primer --help`` stays light). ``section`` is the config
    section whose dataclass ``Call.cfg`` holds (None for none). ``result`` turns the stats
    into the one line the command prints.
    """

    name: str
    help: str
    run: str
    section: str | None
    options: tuple[Option, ...] = ()
    result: Callable[[dict, Call], str] | None = None
    aliases: tuple[str, ...] = ()
    description: str = ""

    def function(self) -> Callable[[Call], dict]:
        module, name = self.run.split(":")
        return getattr(importlib.import_module(module), name)


@dataclass
class Call:
    """One run of a stage: ``cfg`` (its section's dataclass), ``config`` (every section, built),
    ``inputs`` (name -> URL), ``out``, ``params`` and ``overwrite``."""

    stage: Stage
    cfg: Any
    config: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)
    out: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False

    def input(self, name: str) -> str | None:
        return self.inputs.get(name)

    def section(self, name: str) -> Any:
        return self.config[name]


# Config sections and their dataclasses ("module:Class"), imported when first resolved.
SECTIONS: dict[str, str] = {
    "run": "pipeline.app.settings:RunConfig",
    "io": "pipeline.app.settings:IoConfig",
    "spark": "pipeline.app.settings:SparkConfig",
    "subset": "pipeline.app.settings:SubsetConfig",
    "filter": "pipeline.text_filter.config:TextFilterConfig",
    "caption_filter": "pipeline.caption_filter.config:CaptionFilterConfig",
    "download": "pipeline.download.stage:DownloadConfig",
    "embed": "pipeline.embed.config:EmbedConfig",
    "select": "pipeline.select.filters:SelectConfig",
    "materialise": "pipeline.materialise:MaterialiseConfig",
    "evaluate": "pipeline.evaluate.stage:EvaluateConfig",
    "precomputed": "pipeline.precomputed.config:PrecomputedConfig",
    "attribute": "pipeline.evaluate.attribution:AttributeConfig",
}


def section_classes() -> dict[str, type]:
    out = {}
    for name, ref in SECTIONS.items():
        module, cls = ref.split(":")
        out[name] = getattr(importlib.import_module(module), cls)
    return out


def resolve(
    config_file: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every config section, built and checked: ``conf/`` defaults, then ``config_file``, then
    ``--set`` items, then ``settings`` (``{"section.key": value}``, a command's own options;
    ``None`` values are "not given"). Raises :class:`ConfigError` naming every problem."""
    raw = load_config(config_file, overrides)
    for key, value in (settings or {}).items():
        if value is None:
            continue
        section, _, name = key.partition(".")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        raw[section][name] = value
    built = check_sections(raw, section_classes())
    from pipeline.core import io as _io

    _io.configure(built["io"].storage_options)
    return built


def as_dicts(config: Mapping[str, Any]) -> dict[str, dict]:
    """Every section as plain data (``primer config``, ``config.json`` of a run)."""
    return {name: _plain(dataclasses.asdict(obj)) for name, obj in config.items()}


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def default_of(key: str) -> Any:
    """The default of ``section.key`` (the dataclass's, which the YAML files must equal)."""
    section, _, name = key.partition(".")
    cls = section_classes()[section]
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
    return None


def add_stage_parser(
    sub: argparse._SubParsersAction, common: argparse.ArgumentParser, stage: Stage
) -> argparse.ArgumentParser:
    """The stage's ``primer`` subcommand, from its declaration; ``--help`` shows the defaults of
    the options that set config keys."""
    p = sub.add_parser(
        stage.name,
        parents=[common],
        aliases=list(stage.aliases),
        help=stage.help,
        description=stage.description or stage.help,
    )
    for opt in stage.options:
        kwargs = dict(opt.kwargs)
        help_text = opt.help
        if "." in opt.to and ":" not in opt.to and kwargs.get("action") != "store_true":
            default = default_of(opt.to)
            help_text = f"{help_text} (default {default!r}; config key {opt.to})"
        elif "." in opt.to and ":" not in opt.to:
            help_text = f"{help_text} (config key {opt.to})"
        if kwargs.get("action") in ("store_true", "store_false"):
            kwargs.setdefault("default", None)
        dest = opt.to.replace(":", "__").replace(".", "__")
        if opt.flags[0].startswith("-"):
            kwargs["dest"] = dest
            if kwargs.get("action") in (None, "append"):  # `--pool POOL`, not `--pool INPUT__POOL`
                kwargs.setdefault("metavar", opt.flags[0].lstrip("-").upper().replace("-", "_"))
        else:
            kwargs["metavar"] = kwargs.get("metavar", opt.flags[0].upper())
            p.add_argument(dest, help=help_text, **kwargs)
            continue
        p.add_argument(*opt.flags, help=help_text, **kwargs)
    if any(o.to == "out" for o in stage.options):
        p.add_argument(
            "--overwrite", action="store_true", help="redo the output even if it is complete"
        )
    p.set_defaults(func=lambda args, s=stage: run_from_args(s, args))
    return p


def call_from_args(stage: Stage, args: argparse.Namespace) -> Call:
    """The :class:`Call` of a parsed command line."""
    settings, inputs, params, out = {}, {}, {}, None
    for opt in stage.options:
        value = getattr(args, opt.to.replace(":", "__").replace(".", "__"), None)
        if opt.to == "out":
            out = value
        elif opt.to.startswith("input:"):
            if value is not None:
                inputs[opt.to[6:]] = value
        elif opt.to.startswith("param:"):
            params[opt.to[6:]] = value
        else:
            settings[opt.to] = value
    config = resolve(args.config, args.overrides, settings)
    cfg = config[stage.section] if stage.section else None
    overwrite = bool(getattr(args, "overwrite", False))
    return Call(stage, cfg, config, inputs, out, params, overwrite)


def run_call(call: Call) -> dict:
    """Run a stage. A stage that fails before writing anything leaves no output directory
    behind (one holding only its fingerprint counts as nothing written)."""
    from pipeline.core import fingerprint

    existed = bool(call.out) and io.exists(call.out)
    try:
        return call.stage.function()(call)
    except BaseException:
        if call.out and not existed and io.exists(call.out):
            fs, path = io.url_to_fs(call.out)
            try:
                left = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
            except (FileNotFoundError, NotADirectoryError):
                left = []
            if set(left) <= {fingerprint.FILE}:
                with contextlib.suppress(OSError):  # another rank may be removing it too
                    io.remove(call.out)
        raise


def run_from_args(stage: Stage, args: argparse.Namespace) -> int:
    import sys

    call = call_from_args(stage, args)
    stats = run_call(call)
    if stage.result is not None:
        sys.stdout.write(stage.result(stats, call) + "\n")
    return 0


def overrides_from(settings: Mapping[str, Any]) -> list[str]:
    """``--set`` items for ``{"section.key": value}`` (values as YAML)."""
    import yaml

    out = []
    for k, v in settings.items():
        if v is not None:
            out.append(f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}")
    parse_set(out)  # fails early on a malformed key
    return out
