"""The text-filter tests' dataset YAML (the classes of :mod:`tests.text_filter.helpers`)."""

from __future__ import annotations

import pytest


@pytest.fixture
def dataset_yaml(tmp_path):
    p = tmp_path / "pets.yaml"
    p.write_text(
        "name: Pets\nclasses: [tabby cat, golden retriever, desert rose, rose]\n"
        "templates: ['a photo of a {}.']\nsynonyms:\n  golden retriever: [goldie]\n"
    )
    return str(p)
