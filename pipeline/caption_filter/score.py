"""The caption sense filter's pure core: a caption's score for its matched class, over numpy.

score = mean_t cos(caption, template_t(class, sense)) - max_k cos(caption, negative_k)

The first term is how close the caption is to the class read in its sense ("a photo of a
Boxer, a breed of dog or cat, a pet"); the second how close it is to the nearest of a few
dataset-independent other uses of a name on the web (a product, a person or team, a title, a
graphic, a part, a business). A caption scores high when it is nearer the class's sense than
any other use. Compared on tests/data/real_captions (docs/benchmarks.md) with the prototype
alone, the prototype minus the bare name, and class-templated negatives ("{name} as a colour"):
the prototype alone ranks a caption that merely repeats a name ("Boxer shorts") near one that
shows the breed, class-templated negatives pull every caption of that name down together, and
the margin against generic negatives ranked best on the fine-grained sets with enough labelled
rows (Flowers102, Food101, OxfordIIITPet).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.core.config import DatasetSpec

SCORE_COLUMN = "sense_score"


def prototype_texts(spec: DatasetSpec, templates: Sequence[str]) -> list[list[str]]:
    """Per class (label order), its templates filled with its name and its sense
    (:meth:`DatasetSpec.sense_of`)."""
    return [
        [t.replace("{name}", name).replace("{sense}", spec.sense_of(i)) for t in templates]
        for i, name in enumerate(spec.classes)
    ]


@dataclass
class SenseIndex:
    """The class prototypes ``[classes, dim]`` (mean of a class's template embeddings, so a dot
    product is the mean cosine) and the negative anchors ``[k, dim]``, float32."""

    prototypes: np.ndarray
    negatives: np.ndarray


def build_index(
    spec: DatasetSpec,
    templates: Sequence[str],
    negatives: Sequence[str],
    encode: Callable[[list[str]], np.ndarray],
) -> SenseIndex:
    """Encode every class's templates and the negatives once (``encode`` returns unit rows)."""
    texts = prototype_texts(spec, templates)
    flat = encode([t for ts in texts for t in ts])
    protos = flat.reshape(len(texts), len(templates), -1).mean(axis=1)
    return SenseIndex(
        np.ascontiguousarray(protos, np.float32), np.asarray(encode(list(negatives)), np.float32)
    )


def sense_scores(caption_emb: np.ndarray, labels: np.ndarray, index: SenseIndex) -> np.ndarray:
    """float32 scores of unit caption embeddings ``[n, dim]`` against their classes ``labels``
    (int, ``[n]``): mean cosine to the class prototype minus the largest cosine to a negative."""
    if len(labels) == 0:
        return np.zeros(0, np.float32)
    pos = np.einsum("nd,nd->n", caption_emb, index.prototypes[labels])
    neg = (caption_emb @ index.negatives.T).max(axis=1)
    return (pos - neg).astype(np.float32)


def score_captions(
    captions: pa.Array | pa.ChunkedArray,
    labels: np.ndarray,
    index: SenseIndex,
    encode: Callable[[list[str]], np.ndarray],
    batch_size: int,
) -> np.ndarray:
    """Scores of a caption column, ``batch_size`` captions per encoder call; a null or blank
    caption scores NaN (never kept)."""
    texts = captions.to_pylist()
    out = np.full(len(texts), np.nan, np.float32)
    rows = np.array([i for i, t in enumerate(texts) if t and t.strip()], dtype=np.int64)
    for s in range(0, len(rows), batch_size):
        r = rows[s : s + batch_size]
        out[r] = sense_scores(encode([texts[i] for i in r]), labels[r], index)
    return out


def keep(table: pa.Table, scores: np.ndarray, threshold: float) -> tuple[pa.Table, np.ndarray]:
    """The rows scoring at least ``threshold``, in input order, with the ``sense_score`` column
    (float32) appended; and the kept mask."""
    mask = scores >= threshold  # NaN compares False: blank captions are dropped
    kept = table.filter(pa.array(mask)).append_column(
        pa.field(SCORE_COLUMN, pa.float32()), pa.array(scores[mask], pa.float32())
    )
    return kept, mask


def class_counts(labels: np.ndarray, mask: np.ndarray, num_classes: int) -> tuple[list, list]:
    """Per class, the rows kept and dropped (lists of ints in label order)."""
    kept = np.bincount(labels[mask], minlength=num_classes)
    dropped = np.bincount(labels[~mask], minlength=num_classes)
    return kept.tolist(), dropped.tolist()
