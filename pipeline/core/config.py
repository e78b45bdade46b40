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
import importlib.resources
import json
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

# The bundled configs: the repository's conf/, shipped inside the package as pipeline/conf (a
# link to it in a checkout), so an installed wheel finds them too.
CONF_DIR = Path(
    os.environ.get("PRIMER_CONF_DIR") or str(importlib.resources.files("pipeline") / "conf")
)
DATASETS_DIR = CONF_DIR / "datasets"

T = TypeVar("T")


def _yaml_load(text: str):
    """``yaml.safe_load`` with libyaml's parser where PyYAML has it: the pure-Python one is slow
    over large dataset YAMLs (ImageNet's 1000 classes), which every stage and Spark task loads."""
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
    # The text filter's rules beyond names (pipeline.text_filter.terms.MatchRules).
    families: dict[str, tuple[str, ...]] = field(default_factory=dict)
    exclude: dict[str, tuple[str, ...]] = field(default_factory=dict)
    kind_words: dict[str, tuple[str, ...]] = field(default_factory=dict)
    class_kinds: dict[str, tuple[str, ...]] = field(default_factory=dict)
    class_years: dict[str, int] = field(default_factory=dict)
    max_year_gap: int | None = None
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

    def identity(self, *fields: str) -> dict:
        """The dataset's name and the fields a stage's result depends on (for its fingerprint):
        ``identity("classes", "synonyms")``."""
        out: dict = {"name": self.name}
        for f in fields:
            v = getattr(self, f)
            out[f] = {k: list(x) for k, x in v.items()} if isinstance(v, dict) else v
        return out

    def sense_of(self, class_index: int) -> str:
        """The sense the class's name is meant in: ``sense`` (the dataset's domain, "a type of
        flower"), or, where ``sense`` is ``descriptions`` (datasets whose classes share no one
        domain, as ImageNet's), the class's first CuPL description (a gloss of that very
        class); the first template filled with the name where neither is given."""
        if self.sense == "descriptions":
            described = self.class_descriptions(class_index)
            return described[0] if described else self.prompts(class_index)[0]
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
    the text filter never reads them, and large ones (ImageNet's) are slow to parse.

    The text filter's rules (see :class:`pipeline.text_filter.terms.MatchRules`) come from the
    file's ``synonyms``, ``families``, ``exclude``, ``kind_words``, ``class_kinds``,
    ``class_years`` and ``max_year_gap``, and from the ``names`` file it points to (a YAML of
    the same keys, where ``variants`` add to ``synonyms``; the bundled ones are written by
    ``conf/datasets/_variants.py``).

    Raises :class:`ConfigError` naming the file for a missing file, an empty class list,
    duplicate or empty class names, a template without exactly one ``{}``, synonyms or
    descriptions for classes the file does not list, names the caption matcher cannot tell
    apart, a family of fewer than two known classes, an exclusion that does not contain its
    name, or kinds and years of unknown classes.
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
    names = _names_file(raw.get("names"), path, problems)
    synonyms = _lists(raw.get("synonyms"), "synonyms", problems)
    for k, v in _lists(names.get("variants"), "variants", problems).items():
        synonyms[k] = tuple(dict.fromkeys(synonyms.get(k, ()) + v))
    for k in list(synonyms):
        if k not in seen:
            problems.append(f"synonyms given for unknown class {k!r}")
            del synonyms[k]
    rules: dict[str, Any] = {}
    for key in ("families", "exclude", "kind_words", "class_kinds"):
        # The names file's lists and the config's add up (the config's own after).
        merged = _lists(names.get(key), key, problems)
        for k, v in _lists(raw.get(key), key, problems).items():
            merged[k] = tuple(dict.fromkeys(merged.get(k, ()) + v))
        rules[key] = merged
    years = {**(names.get("class_years") or {}), **(raw.get("class_years") or {})}
    if not isinstance(years, Mapping) or not all(
        isinstance(y, int) and not isinstance(y, bool) for y in years.values()
    ):
        problems.append("'class_years' must map class names to integer years")
        years = {}
    rules["class_years"] = dict(years)
    gap = raw.get("max_year_gap", names.get("max_year_gap"))
    if gap is not None and (not isinstance(gap, int) or isinstance(gap, bool) or gap < 0):
        problems.append(f"'max_year_gap' must be a whole number of years >= 0, not {gap!r}")
        gap = None
    rules["max_year_gap"] = gap
    problems += _matcher_conflicts(classes, synonyms, rules)
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
        **rules,
        imagenet_indices=indices,
        layout=str(raw.get("layout") or "imagefolder"),
        source=str(raw.get("source") or ""),
        path=str(path),
        sense=str(raw.get("sense") or "").strip(),
    )


def _lists(value: Any, what: str, problems: list[str]) -> dict[str, tuple[str, ...]]:
    """A mapping of names to lists of strings (a single string is a list of one)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.append(f"{what!r} must map names to lists of strings")
        return {}
    out = {}
    for k, v in value.items():
        items = [v] if isinstance(v, str) else list(v or [])
        out[str(k)] = tuple(str(t) for t in items if str(t).strip())
    return out


def _names_file(ref: Any, path: Path, problems: list[str]) -> dict:
    """The ``names`` file a dataset config points to (relative to it), or {}."""
    if not ref:
        return {}
    p = Path(str(ref))
    if not p.is_absolute():
        p = path.parent / p
    try:
        names = _yaml_load(p.read_text(encoding="utf-8")) or {}
    except OSError:
        problems.append(f"names file {str(p)!r} does not exist")
        return {}
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        problems.append(f"names file {str(p)!r} is not valid YAML ({e})")
        return {}
    if not isinstance(names, Mapping):
        problems.append(f"names file {str(p)!r} must hold a mapping")
        return {}
    return dict(names)


def _matcher_conflicts(
    classes: list[str], synonyms: Mapping[str, tuple[str, ...]], rules: Mapping | None = None
) -> list[str]:
    """What the caption matcher could not use as given (see
    :func:`pipeline.text_filter.terms.check`).

    Captions are matched after normalisation (case, punctuation, Unicode NFKC; see
    :mod:`pipeline.text_filter.matcher`). Two classes that normalise alike (``Rose``/``rose``),
    or a synonym that normalises to another class's name, would make every caption naming them
    ambiguous, so all of them would be dropped; a name with no letter or digit matches nothing;
    an exclusion that does not contain its name would never apply.
    """
    from pipeline.text_filter.terms import MatchRules, check

    index: dict[str, int] = {}
    for i, c in enumerate(classes):  # exact duplicates and empty names are reported already
        if c:
            index.setdefault(c, i)
    first = [c for c in classes if c and index[c] == classes.index(c)]
    try:
        return check(MatchRules(tuple(dict.fromkeys(first)), synonyms, **dict(rules or {})))
    except (TypeError, ValueError) as e:
        return [f"match rules: {e}"]


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


def closest(name: str, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the option nearest to a misspelt ``name``, or ``""``."""
    import difflib

    near = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.5)
    return f" (did you mean {near[0]!r}?)" if near else ""


def build(cls: type[T], section: Mapping | None, where: str = "") -> T:
    """Build the frozen dataclass ``cls`` from a config mapping, validating every field.

    Raises :class:`ConfigError` listing all unknown keys (each with the closest valid one) and
    badly typed values at once. ``where`` names the config section in messages (``"filter"``).
    """
    section = dict(section or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    problems = []
    for k in sorted(set(section) - names, key=str):
        moved = MOVED.get(f"{where}.{k}")
        hint = f" (it is now {moved!r})" if moved else closest(k, names)
        problems.append(f"unknown key {k!r}{hint}")
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


# Settings that moved to another section (their old spelling gets a message naming the new).
MOVED = {
    "subset.model": "embed.model",
    "subset.pretrained": "embed.pretrained",
    "subset.checkpoint": "embed.checkpoint",
    "subset.device": "embed.device",
    "subset.master": "spark.master",
    "subset.min_prob": "select.min_prob",
    "subset.require_agreement": "select.require_agreement",
    "subset.k": "select.k",
    "subset.materialise_format": "materialise.format",
    "subset.shots": "evaluate.shots",
    "subset.seeds": "evaluate.seeds",
    "subset.alpha": "evaluate.alpha",
    "subset.head": "evaluate.head",
}


def check_sections(cfg: Mapping, sections: Mapping[str, type]) -> dict[str, Any]:
    """Build every section of a resolved config with its dataclass, at once.

    Raises :class:`ConfigError` naming every unknown section (with the closest valid one),
    unknown key and badly typed value, so a run never starts on a misspelt setting.
    """
    problems = []
    for name in cfg:
        if name not in sections:
            problems.append(f"unknown config section {name!r}{closest(name, sections)}")
    built = {}
    for name, cls in sections.items():
        try:
            built[name] = build(cls, cfg.get(name) or {}, where=name)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))
    return built


def to_dict(obj: Any) -> dict:
    """A config dataclass as a plain dict (for writing next to the outputs)."""
    return dataclasses.asdict(obj)
