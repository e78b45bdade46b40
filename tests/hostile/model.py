"""The hostile-input catalogue's vocabulary: a case (:class:`HostileCase`), its expected outcome
(:func:`error`, :func:`counted`, :func:`accepted`), what a stage did with it (:class:`Outcome`)
and the check of one against the other (:func:`verify`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Expect:
    """An expected outcome (build with :func:`error`, :func:`counted` or :func:`accepted`)."""

    kind: str  # "error" | "counted" | "accepted"
    what: str  # error: message pattern; counted: the reason; accepted: a description
    exc: type[BaseException] | None = None
    check: Callable[[dict], Any] | None = None
    note: str = ""

    def describe(self) -> str:
        note = f" ({self.note})" if self.note else ""
        if self.kind == "error":
            return f"{self.exc.__name__} naming the file: `{readable(self.what)}`{note}"
        if self.kind == "counted":
            return f"skipped, counted as `{self.what}`{note}"
        return f"accepted: {self.what}"


def readable(pattern: str) -> str:
    """A message pattern as prose: ``.*`` becomes an ellipsis, escapes are dropped."""
    return re.sub(r"\\(.)", r"\1", pattern.replace(".*", "…").lstrip("^"))


def error(
    exc: type[BaseException], pattern: str, check: Callable[[dict], Any] | None = None
) -> Expect:
    return Expect("error", pattern, exc, check)


def counted(reason: str, check: Callable[[dict], Any] | None = None, note: str = "") -> Expect:
    return Expect("counted", reason, check=check, note=note)


def accepted(what: str, check: Callable[[dict], Any] | None = None) -> Expect:
    return Expect("accepted", what, check=check)


@dataclass(frozen=True)
class HostileCase:
    name: str
    stage: str
    build_input: Callable[..., Any]
    expected: Expect
    xfail: str = ""  # a known bug in a module this file may not change: strict xfail


@dataclass
class Outcome:
    """What a stage did with one input: ``kind`` as in :class:`Expect`; ``text`` is the error
    message or the counted reason; ``detail`` what a ``check`` may look at."""

    kind: str
    text: str = ""
    exc: BaseException | None = None
    detail: dict = field(default_factory=dict)


def verify(case: HostileCase, got: Outcome, where: str | None = None) -> None:
    exp = case.expected
    assert got.kind == exp.kind, f"{case.name}: expected {exp.describe()}, got {got}"
    if exp.kind == "error":
        assert isinstance(got.exc, exp.exc), got.exc
        assert re.search(exp.what, got.text), got.text
        if where is not None:
            assert where in got.text, f"the message does not name {where}: {got.text}"
    elif exp.kind == "counted":
        assert got.text == exp.what, got
        assert got.detail.get("count", 1) == 1, got.detail
    if exp.check is not None:
        assert exp.check(got.detail), got.detail
