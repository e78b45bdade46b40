"""docs/testing.md is what ``python -m tests.catalogue`` prints, every test it names exists, and
every test named for a fault (killed, resumed, failing, a lock...) is on it."""

from __future__ import annotations

import ast
import importlib
import os

from tests import catalogue
from tests.hostile.cases import HOSTILE_TEST

FIX = "run `python -m tests.catalogue > docs/testing.md` and commit the page"


def _test_names(rel: str) -> set[str]:
    """The test functions a module defines (its top level and its classes)."""
    tree = ast.parse(open(os.path.join(catalogue.REPO, rel), encoding="utf-8").read())
    names = set()
    for node in tree.body:
        body = node.body if isinstance(node, ast.ClassDef) else [node]
        names |= {n.name for n in body if isinstance(n, ast.FunctionDef)}
    return {n for n in names if n.startswith("test_")}


def test_the_page_is_current():
    with open(os.path.join(catalogue.REPO, "docs", "testing.md"), encoding="utf-8") as f:
        page = f.read()
    assert page == catalogue.render(), f"docs/testing.md is out of date: {FIX}"


def test_every_test_the_page_names_exists():
    named = [t for p in catalogue.FAULTS + catalogue.HOSTILE for t in p.tests] + [HOSTILE_TEST]
    for node in named:
        rel, _, name = node.partition("::")
        assert os.path.exists(os.path.join(catalogue.REPO, rel)), f"{node}: no such file"
        module = importlib.import_module(rel[: -len(".py")].replace("/", "."))
        test = name.split("[")[0]
        assert callable(getattr(module, test, None)), f"{node}: no such test in {rel}"


def test_every_fault_test_is_on_the_page():
    listed = {t.split("[")[0] for p in catalogue.FAULTS + catalogue.HOSTILE for t in p.tests}
    missing = [
        f"{rel}::{name}"
        for rel in catalogue.list_test_files()
        for name in sorted(_test_names(rel))
        if catalogue.FAULT_WORDS & set(name.split("_")) and f"{rel}::{name}" not in listed
    ]
    assert not missing, (
        f"tests named for a fault but on no line of docs/testing.md: {missing}; add them to "
        f"FAULTS or HOSTILE in tests/catalogue.py, then {FIX}"
    )


def test_the_layout_lists_every_test_module_once():
    files = catalogue.list_test_files()
    assert len(files) == len(set(files)) and "tests/test_catalogue.py" in files
    assert "tests/hostile/test_hostile.py" in files and "tests/conftest.py" not in files
    assert all(catalogue._first_paragraph(os.path.join(catalogue.REPO, f)) for f in files), (
        "every test module opens with a docstring saying what it tests"
    )
