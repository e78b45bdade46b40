"""Label spaces: reusing one dataset's labels (a pool, a text head) for another dataset.

ImageNet-R and ImageNet-A hold 200 of ImageNet's 1000 classes; their configs carry
``imagenet_indices`` (the 1000-class index of each of their labels). A pool or a text head made
for ImageNet can then serve them, and one made for them can serve ImageNet, through
:func:`label_map`; labels are mapped, or dropped and counted when the other dataset lacks the
class, never reused as they are. Every mapping is checked against the class names.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.config import ConfigError, DatasetSpec


def _imagenet_1k(spec: DatasetSpec) -> bool:
    return spec.imagenet_indices is None and spec.num_classes == 1000


def label_map(source: DatasetSpec, target: DatasetSpec) -> np.ndarray:
    """int64 ``[source.num_classes]``: the ``target`` label of each ``source`` label, -1 where
    ``target`` lacks the class.

    Same classes: the identity. A 1000-class ImageNet config and a config with
    ``imagenet_indices`` (either way round), or two configs with indices: through the
    1000-class indices.

    Raises:
        ConfigError: no mapping is known between the two, or a mapped pair's class names
            differ (a config whose indices do not match its names).
    """
    if list(source.classes) == list(target.classes):
        return np.arange(source.num_classes, dtype=np.int64)
    if source.imagenet_indices is not None and _imagenet_1k(target):
        out = np.asarray(source.imagenet_indices, np.int64)
    elif _imagenet_1k(source) and target.imagenet_indices is not None:
        out = np.full(1000, -1, np.int64)
        out[np.asarray(target.imagenet_indices)] = np.arange(target.num_classes)
    elif source.imagenet_indices is not None and target.imagenet_indices is not None:
        where = {int(i): j for j, i in enumerate(target.imagenet_indices)}
        out = np.array([where.get(int(i), -1) for i in source.imagenet_indices], np.int64)
    else:
        raise ConfigError(
            f"no label mapping from {source.name} ({source.num_classes} classes) to "
            f"{target.name} ({target.num_classes} classes): use a pool and text embeddings made "
            f"for {target.name}, or configs that carry imagenet_indices"
        )
    for s in np.flatnonzero(out >= 0):
        if source.classes[s] != target.classes[out[s]]:
            raise ConfigError(
                f"{source.name} label {s} ({source.classes[s]!r}) maps to {target.name} label "
                f"{out[s]} ({target.classes[out[s]]!r}): the imagenet_indices do not match the "
                "class names"
            )
    return out


def apply_map(labels: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """Mapped labels (int64); -1 for labels outside ``[0, len(mapping))`` or unmapped."""
    y = np.asarray(labels, np.int64)
    ok = (y >= 0) & (y < len(mapping))
    return np.where(ok, mapping[np.clip(y, 0, max(len(mapping) - 1, 0))], -1)
