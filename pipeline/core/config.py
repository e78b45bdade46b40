"""Configuration: the dataset registry and the per-stage config objects.

Resolution order for every stage's settings (later wins):
1. the defaults in ``conf/default.yaml`` and ``conf/stages/<section>.yaml`` (which mirror the
   stage dataclasses' defaults),
2. a user YAML file (``--config FILE``),
3. ``--set section.key=value`` overrides (values parsed as YAML: ``--set filter.cap=100``),
4. the stage's own command-line flags.

Each stage validates its section once with :func:`build`, which names every unknown key and
every wrongly-typed value in one error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

CONF_DIR = Path(os.environ.get("PRIMER_CONF_DIR", Path(__file__).resolve().parents[2] / "conf"))
DATASETS_DIR = CONF_DIR / "datasets"

T = TypeVar("T")


def _yaml_load(text: str):
    """``yaml.safe_load`` with libyaml's parser where PyYAML has it: the pure-Python one takes
    0.15 s over ImageNet's 1000-class YAML, which every stage and every Spark task loads."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says what and where."""


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class DatasetSpec:
    """A target task: class names in label order, prompt templates and optional extras."""

    name: str
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    synonyms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    descriptions: dict[str, list[str]] | None = None
    imagenet_indices: tuple[int, ...] | None = None
    layout: str = "imagefolder"
    source: str = ""
    path: str = ""
    # What the class names are, in a few words ("a type of flower"): the caption sense filter
    # reads a caption's class name in this sense. Empty: the templates say it.
    sense: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def prompts(self, class_index: int) -> list[str]:
        """The class's name formatted into every template."""
        name = self.classes[class_index]
        return [t.replace("{}", name) for t in self.templates]

    def sense_of(self, class_index: int) -> str:
        """The sense the class's name is meant in: the first CuPL description where the dataset
        has them (a gloss of that very class), else ``sense`` (the dataset's domain), else the
        first template filled with the name."""
        described = self.class_descriptions(class_index)
        if described:
            return described[0]
        return self.sense or self.prompts(class_index)[0]

    def class_descriptions(self, class_index: int) -> list[str]:
        """CuPL-style sentences for the class (empty when there is no descriptions file)."""
        if not self.descriptions:
            return []
        return list(self.descriptions.get(self.classes[class_index], []))


def list_datasets() -> list[str]:
    """Names of the bundled dataset configs."""
    return sorted(p.stem for p in DATASETS_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _resolve_dataset_path(name_or_path: str | os.PathLike) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"dataset config file {str(p)!r} does not exist")
        return p
    bundled = DATASETS_DIR / f"{name_or_path}.yaml"
    if bundled.exists():
        return bundled
    lower = {n.lower(): n for n in list_datasets()}
    if str(name_or_path).lower() in lower:
        return DATASETS_DIR / f"{lower[str(name_or_path).lower()]}.yaml"
    raise ConfigError(
        f"unknown dataset {str(name_or_path)!r}: give a bundled name ({', '.join(list_datasets())}) "
        "or the path of a YAML file"
    )


def load_dataset(name_or_path: str | os.PathLike, descriptions: bool = True) -> DatasetSpec:
    """Load a bundled dataset by name (``StanfordCars``) or a user's YAML file by path.

    ``descriptions=False`` skips the CuPL descriptions file (``spec.descriptions`` is None):
    the text filter never reads them, and ImageNet's take 50 ms to parse.

    Raises :class:`ConfigError` naming the file for a missing file, an empty class list,
    duplicate or empty class names, a template without exactly one ``{}``, or synonyms or
    descriptions for classes the file does not list.
    """
    want_descriptions = descriptions
    path = _resolve_dataset_path(name_or_path)
    try:
        raw = _yaml_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    where = str(path)
    classes = raw.get("classes")
    if not classes or not isinstance(classes, list):
        raise ConfigError(f"{where}: 'classes' must be a non-empty list of class names")
    classes = [str(c).strip() if c is not None else "" for c in classes]
    problems = []
    empty = [i for i, c in enumerate(classes) if not c]
    if empty:
        problems.append(f"empty class name at label(s) {empty[:10]}")
    seen: dict[str, int] = {}
    for i, c in enumerate(classes):
        if c and c in seen:
            problems.append(f"duplicate class name {c!r} at labels {seen[c]} and {i}")
        seen.setdefault(c, i)
    templates = raw.get("templates") or ["a photo of a {}."]
    if not isinstance(templates, list):
        problems.append(f"'templates' must be a list of strings, not {type(templates).__name__}")
        templates = []
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            problems.append(f"template {t!r} must contain exactly one '{{}}'")
    synonyms_raw = raw.get("synonyms") or {}
    if not isinstance(synonyms_raw, Mapping):
        problems.append("'synonyms' must map class names to lists of terms")
        synonyms_raw = {}
    synonyms: dict[str, tuple[str, ...]] = {}
    for k, v in synonyms_raw.items():
        if k not in seen:
            problems.append(f"synonyms given for unknown class {k!r}")
            continue
        terms = [v] if isinstance(v, str) else list(v or [])
        synonyms[k] = tuple(str(t) for t in terms if str(t).strip())
    problems += _matcher_conflicts(classes, synonyms)
    descriptions = None
    desc_ref = raw.get("descriptions")
    if desc_ref and want_descriptions:
        desc_path = Path(desc_ref)
        if not desc_path.is_absolute():
            desc_path = path.parent / desc_path
        if not desc_path.exists():
            problems.append(f"descriptions file {str(desc_path)!r} does not exist")
        else:
            try:
                descriptions = json.loads(desc_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                problems.append(f"descriptions file {str(desc_path)!r} is not valid JSON ({e})")
    indices = raw.get("imagenet_indices")
    if indices is not None:
        if len(indices) != len(classes):
            problems.append(
                f"imagenet_indices has {len(indices)} entries for {len(classes)} classes"
            )
        indices = tuple(int(i) for i in indices)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return DatasetSpec(
        name=str(raw.get("name") or path.stem),
        classes=tuple(classes),
        templates=tuple(templates),
        synonyms=synonyms,
        descriptions=descriptions,
        imagenet_indices=indices,
        layout=str(raw.get("layout") or "imagefolder"),
        source=str(raw.get("source") or ""),
        path=str(path),
        sense=str(raw.get("sense") or "").strip(),
    )


def _matcher_conflicts(classes: list[str], synonyms: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Class names and synonyms the caption matcher could never tell apart.

    Captions are matched after normalisation (case, punctuation, Unicode NFKC; see
    :mod:`pipeline.text_filter.matcher`). Two classes that normalise alike (``Rose``/``rose``), or a synonym
    that normalises to another class's name, would make every caption naming them ambiguous,
    so all of them would be dropped; a name with no letter or digit matches nothing.
    """
    from pipeline.text_filter.matcher import normalize_texts

    index: dict[str, int] = {}
    for i, c in enumerate(classes):  # exact duplicates and empty names are reported already
        if c:
            index.setdefault(c, i)
    terms = [(f"class name {c!r} (label {i})", i) for c, i in index.items()]
    for c, ts in synonyms.items():
        terms += [(f"synonym {t!r} of {c!r} (label {index[c]})", index[c]) for t in ts]
    texts = list(index) + [t for ts in synonyms.values() for t in ts]
    problems = []
    owner: dict[str, tuple[str, int]] = {}
    for (what, label), key in zip(terms, normalize_texts(texts)):
        if not key.strip():
            problems.append(f"{what} has no letter or digit to match")
            continue
        first = owner.setdefault(key, (what, label))
        if first[1] != label:
            problems.append(
                f"{first[0]} and {what} are the same name to the caption matcher ({key!r})"
            )
    return problems


# --------------------------------------------------------------------------- run config


def _deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def parse_set(items: Iterable[str]) -> dict:
    """Turn ``["a.b=1", "c=x"]`` into ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            parsed = _yaml_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p!r} is both a value and a section")
        node[parts[-1]] = parsed
    return out


def load_config(user_file: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> dict:
    """The resolved configuration: ``conf/default.yaml`` and ``conf/stages/<section>.yaml``,
    then ``user_file``, then ``--set`` items."""
    default_path = CONF_DIR / "default.yaml"
    cfg = _yaml_load(default_path.read_text(encoding="utf-8")) if default_path.exists() else {}
    cfg = cfg or {}
    # One file per stage section keeps each stage's defaults beside the others without
    # every stage editing one shared file: conf/stages/filter.yaml is section "filter".
    for stage_file in sorted((CONF_DIR / "stages").glob("*.yaml")):
        section = _yaml_load(stage_file.read_text(encoding="utf-8")) or {}
        cfg[stage_file.stem] = _deep_merge(section, cfg.get(stage_file.stem) or {})
    if user_file:
        p = Path(user_file)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        user = _yaml_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(user, Mapping):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        cfg = _deep_merge(cfg, user)
    return _deep_merge(cfg, parse_set(overrides))


def _check_type(value: Any, tp: Any) -> Any:
    """Coerce ``value`` to the annotated type where that is lossless; raise TypeError otherwise."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arm)
            except TypeError as e:
                errors.append(str(e))
        raise TypeError(" or ".join(errors) or f"expected {tp}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise TypeError(f"expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, Iterable):
            if isinstance(value, str):
                # "0,1,2" from a command line: each item parsed as YAML, like --set values.
                value = [_yaml_load(v.strip()) for v in value.split(",") if v.strip()]
            else:
                raise TypeError(f"expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_check_type(v, inner) for v in value]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError(f"expected a string, got {value!r}")
    return value


def build(cls: type[T], section: Mapping | None, where: str = "") -> T:
    """Build the frozen dataclass ``cls`` from a config mapping, validating every field.

    Raises :class:`ConfigError` listing all unknown keys and badly typed values at once.
    ``where`` names the config section in messages (for example ``"filter"``).
    """
    section = dict(section or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    problems = []
    unknown = sorted(set(section) - names)
    if unknown:
        problems.append(f"unknown key(s) {unknown} (known: {sorted(names)})")
    kwargs = {}
    for k, v in section.items():
        if k not in names:
            continue
        try:
            kwargs[k] = _check_type(v, hints[k])
        except TypeError as e:
            problems.append(f"{k}: {e}")
    prefix = f"config section {where!r}: " if where else f"{cls.__name__}: "
    if problems:
        raise ConfigError(prefix + "; ".join(problems))
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(prefix + str(e)) from e
    return obj


def stage_config(
    cls: type[T],
    section: str,
    config_file: str | None = None,
    overrides: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> T:
    """Resolve one stage's config object: defaults, user file, ``--set``, then explicit flags.

    ``flags`` holds the stage's own command-line options; ``None`` values mean "not given".
    """
    cfg = load_config(config_file, overrides)
    values = dict(cfg.get(section) or {})
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    return build(cls, values, where=section)


def to_dict(obj: Any) -> dict:
    """A config dataclass as a plain dict (for writing next to the outputs)."""
    return dataclasses.asdict(obj)
