"""What made an output: every stage records a fingerprint beside its ``_SUCCESS``.

A fingerprint holds the stage's name and output format version, the settings that change its
result (fields marked ``result=False`` in a config dataclass, such as worker counts or memory
budgets, are left out), the parts of the dataset config it reads, the model's identity and the
identity of every input: another stage's output by that output's own fingerprint (so a change
upstream reaches every stage after it), raw files by their names relative to the input's root,
sizes and modification times (so a moved run directory or a copied input stays the same).

:func:`prepare` decides what a stage does with its output directory: a complete output of the
same fingerprint is reused; one of another refuses with :class:`StaleOutputError` naming the
keys that differ (``--overwrite`` redoes it); an unfinished one of the same fingerprint is
resumed, of another is cleared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from pipeline.core import io

log = logging.getLogger(__name__)

FILE = "_FINGERPRINT"  # JSON; no .json suffix: img2dataset reads every top-level *.json


class StaleOutputError(io.InputError):
    """A complete output made by other inputs or settings; the message names what differs."""


def result_field(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A config field that changes only how work is done, never its result: left out of the
    fingerprint (``dataclasses.field`` with ``metadata={"result": False}``)."""
    meta = {**kwargs.pop("metadata", {}), "result": False}
    return dataclasses.field(default=default, metadata=meta, **kwargs)


def result_settings(cfg: Any, keys: Iterable[str] | None = None) -> dict:
    """The fields of a config dataclass that can change a stage's result (``keys`` narrows them)."""
    fields = [f for f in dataclasses.fields(cfg) if f.metadata.get("result", True)]
    wanted = None if keys is None else set(keys)
    return {
        f.name: _plain(getattr(cfg, f.name)) for f in fields if wanted is None or f.name in wanted
    }


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def digest(obj: Any) -> str:
    """SHA-256 of an object's canonical JSON."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_identity(url: str, suffixes: tuple[str, ...] = (), **storage_options: Any) -> dict:
    """The files under ``url`` (a file, a directory searched recursively, or a glob) by name
    relative to it, size and modification time, summarised as ``{files, bytes, sha256}``;
    ``{"missing": url}`` when nothing is there."""
    fs, root = io.url_to_fs(url, **storage_options)
    try:
        if any(c in root for c in "*?["):
            found = {p: fs.info(p) for p in fs.glob(root)}
            base = root.split("*", 1)[0].rsplit("/", 1)[0]
        elif fs.isdir(root):
            found = fs.find(root, detail=True)
            base = root
        elif fs.exists(root):
            found = {root: fs.info(root)}
            base = root.rsplit("/", 1)[0]
        else:
            return {"missing": url}
    except FileNotFoundError:
        return {"missing": url}
    rows = []
    for path, info in sorted(found.items()):
        name = path[len(base) :].lstrip("/") if path.startswith(base) else path
        leaf = name.rsplit("/", 1)[-1]
        if info.get("type") == "directory" or leaf.startswith((".", "_")):
            continue
        if suffixes and not leaf.endswith(suffixes):
            continue
        mtime = info.get("mtime", info.get("LastModified", info.get("created", "")))
        rows.append([name, int(info.get("size") or 0), str(mtime)])
    return {"files": len(rows), "bytes": sum(r[1] for r in rows), "sha256": digest(rows)}


def output_identity(url: str) -> dict | None:
    """A complete stage output's identity: its fingerprint's digest and the id of the run that
    wrote it (so an output redone with the same settings still reaches the stages after it);
    None where ``url`` holds no fingerprinted complete output."""
    try:
        if not io.is_done(url):
            return None
        stored = io.read_json(io.join(url, FILE))
    except (FileNotFoundError, OSError, ValueError):
        return None
    return {"stage": stored.get("stage"), "digest": stored.get("digest"), "run": stored.get("run")}


def input_identity(url: str, suffixes: tuple[str, ...] = ()) -> dict:
    """How a stage names one of its inputs in its fingerprint: by the input's fingerprint when
    it is a stage output, else by its files."""
    return output_identity(url) or file_identity(url, suffixes)


def make(
    stage: str,
    version: int,
    config: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Any] | None = None,
    **parts: Any,
) -> dict:
    """A stage's fingerprint: ``{stage, version, config, inputs, <parts>..., digest}``.

    ``config``: the settings that change the result (see :func:`result_settings`); ``inputs``:
    name -> identity (:func:`input_identity`); ``parts``: anything else the result depends on
    (the dataset's classes, the model, ...). The digest covers all of it.
    """
    body = {
        "stage": stage,
        "version": int(version),
        "config": dict(config or {}),
        "inputs": dict(inputs or {}),
        **{k: v for k, v in parts.items() if v is not None},
    }
    body = json.loads(json.dumps(body, default=str))  # canonical: tuples as lists, ...
    return {**body, "digest": digest(body)}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two fingerprints (a changed input is named once,
    not by each of its identity's fields)."""
    a = _flatten({k: v for k, v in old.items() if k not in ("digest", "run")})
    b = _flatten({k: v for k, v in new.items() if k not in ("digest", "run")})
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    named: list[str] = []
    for k in keys:
        short = ".".join(k.split(".")[:2]) if k.startswith("inputs.") else k
        if short not in named:
            named.append(short)
    return named


def stored(out: str) -> dict | None:
    """The fingerprint recorded in an output directory, or None."""
    try:
        return io.read_json(io.join(out, FILE))
    except (FileNotFoundError, OSError, ValueError):
        return None


def prepare(out: str, fingerprint: Mapping[str, Any], overwrite: bool = False) -> bool:
    """Get ``out`` ready for a stage whose fingerprint is ``fingerprint``; False means skip.

    - complete, same fingerprint: False (reused), unless ``overwrite`` (cleared and redone);
    - complete, another fingerprint (or none, from an older Primer): :class:`StaleOutputError`
      naming the differing keys, unless ``overwrite``;
    - unfinished, same fingerprint: True, the stage resumes from what is there;
    - unfinished, another fingerprint: cleared (a failed run with other inputs or settings).

    The fingerprint is written when the stage starts, so an unfinished output knows what made
    it; ``_SUCCESS`` is still written last by the stage.
    """
    old = stored(out)
    same = old is not None and old.get("digest") == fingerprint["digest"]
    if io.is_done(out):
        if same and not overwrite:
            log.info("%s is complete and made from the same inputs and settings; reusing it", out)
            return False
        if not overwrite:
            what = (
                ", ".join(differences(old, fingerprint))
                if old
                else "no fingerprint (made by an older Primer)"
            )
            raise StaleOutputError(
                f"{out} holds a complete output of other inputs or settings ({what}); pass "
                "--overwrite to redo it, or choose another output directory"
            )
        log.info("overwriting %s", out)
        io.remove(out)
        old, same = None, False
    elif old is not None and not same:
        log.warning(
            "%s holds an unfinished output of other inputs or settings (%s); starting over",
            out, ", ".join(differences(old, fingerprint)),
        )  # fmt: skip
        io.remove(out)
    io.makedirs(out)
    if not same:
        io.write_json(io.join(out, FILE), {**fingerprint, "run": uuid.uuid4().hex})
    return True


def reuse(out: str, fingerprint: Mapping[str, Any], overwrite: bool = False) -> bool:
    """True when ``out`` is complete with this fingerprint (a caller may read its results);
    the same checks as :func:`prepare`, without touching the directory."""
    if overwrite or not io.is_done(out):
        return False
    old = stored(out)
    if old is not None and old.get("digest") == fingerprint["digest"]:
        return True
    what = ", ".join(differences(old, fingerprint)) if old else "no fingerprint"
    raise StaleOutputError(
        f"{out} holds a complete output of other inputs or settings ({what}); pass --overwrite "
        "to redo it, or choose another output directory"
    )
