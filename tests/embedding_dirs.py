"""Embedding directories written the way the embed stages write them, for tests that need
their inputs without running a model."""

from __future__ import annotations

import numpy as np

from pipeline.core import embeddings as E
from pipeline.core import io


def write_text_embeddings(url: str, prompts: np.ndarray, labels=None, **meta) -> str:
    """A text-embedding directory as ``embed-text`` writes it: one template prompt per row of
    ``prompts`` under ``labels`` (default: row i is class i), classes named ``class<i>``,
    ``meta`` added to meta.json. Returns ``url``."""
    n = len(prompts)
    labels = list(range(n)) if labels is None else list(labels)
    c = max(labels) + 1
    E.write_shard(
        url, "text", [f"t{i}" for i in range(n)], labels, prompts,
        extra={"kind": ["template"] * n, "prompt": [f"p{i}" for i in range(n)]},
    )  # fmt: skip
    io.write_json(
        io.join(url, E.META),
        {
            "num_classes": c,
            "classnames": [f"class{i}" for i in range(c)],
            "embed_dim": prompts.shape[1],
            "kind": "text",
            **meta,
        },
    )
    io.mark_done(url)
    return url
