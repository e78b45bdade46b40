"""Synthetic evaluation worlds: Gaussian class clusters, a noisy text head, a noisy caption pool.

A world imitates what the evaluation sees on a real run, in a few dimensions: class clusters
around a shared direction (CLIP image features occupy a narrow cone), a text head that points
at each class through a modality gap and with noise (zero-shot CLIP's errors), a priming pool
whose captions name a random class for a fraction of images (LAION's noise), whose class sizes
vary (a few classes get thousands of images, some tens), and whose images may sit off the
target task's distribution (a per-class shift). The CLIP-score filter with
``require_agreement`` keeps the pool images the text head classifies as their caption says,
as :func:`pipeline.select.filters.clip_score_decision` does. Used by
tests/evaluate/test_alpha.py and bench/alpha.py to measure the automatic alpha rules against
the best alpha in hindsight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from pipeline.evaluate.classify import class_sums, predict, weights_from_sums
from pipeline.evaluate.protocols import TRANSDUCTIVE_PRIMING, Priming, Task


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class WorldSpec:
    """Parameters of one world (noise levels are norms of the noise relative to unit vectors).

    Attributes:
        classes, dim: number of classes and feature dimension.
        spread: norm of an image's noise around its class centre.
        text_noise: norm of the noise on each class's text direction.
        gap: weight of the direction shared by every text row (CLIP's modality gap).
        label_noise: fraction of pool captions that name a uniformly random class.
        pool_per_class: median pool images per class; ``imbalance`` is the sigma of the
            log-normal spread of class sizes (0: equal sizes).
        shift: norm of a per-class offset of the pool's images from the task's.
        styles, style_strength, style_skew: nuisance directions shared by all classes (0: none),
            their norm, and the probability that a pool image takes its class's favourite
            one instead of a random one (task images always take a random one).
        test_per_class, train_per_class: task images per class.
        seed: everything is drawn from ``numpy.random.default_rng(seed)``.
    """

    classes: int = 30
    dim: int = 64
    spread: float = 2.0
    text_noise: float = 0.6
    gap: float = 1.0
    label_noise: float = 0.3
    pool_per_class: int = 120
    imbalance: float = 0.8
    shift: float = 0.3
    styles: int = 0
    style_strength: float = 0.0
    style_skew: float = 0.0
    test_per_class: int = 100
    train_per_class: int = 50
    seed: int = 0


@dataclass
class World:
    """One drawn world. Features are float32 unit rows; ``pool_labels`` are caption labels,
    ``pool_true`` the classes the pool images were drawn from, ``kept`` the CLIP filter's
    agreement decision (zero-shot prediction equals the caption label)."""

    spec: WorldSpec
    text: np.ndarray
    train_feats: np.ndarray
    train_labels: np.ndarray
    test_feats: np.ndarray
    test_labels: np.ndarray
    pool_feats: np.ndarray
    pool_labels: np.ndarray
    pool_true: np.ndarray
    kept: np.ndarray


def make_world(spec: WorldSpec) -> World:
    """Draw the world ``spec`` describes (deterministic in ``spec.seed``)."""
    rng = np.random.default_rng(spec.seed)
    c, d = spec.classes, spec.dim

    def noise(n: int, scale: float) -> np.ndarray:
        return scale * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)

    common = _unit(rng.standard_normal(d))
    centers = _unit(common + 0.8 * _unit(rng.standard_normal((c, d))))
    gap_dir = _unit(rng.standard_normal(d))
    text = _unit(spec.gap * gap_dir + _unit(centers + noise(c, spec.text_noise)))

    style_dirs = spec.style_strength * _unit(rng.standard_normal((max(spec.styles, 1), d)))
    favourite = rng.integers(0, max(spec.styles, 1), c)

    def draw(labels: np.ndarray, offset: np.ndarray | None = None, skew: float = 0.0):
        mean = centers[labels] if offset is None else centers[labels] + offset[labels]
        if spec.styles:
            style = rng.integers(0, spec.styles, len(labels))
            fav = rng.random(len(labels)) < skew
            style[fav] = favourite[labels[fav]]
            mean = mean + style_dirs[style]
        return _unit(mean + noise(len(labels), spec.spread))

    train_y = np.repeat(np.arange(c), spec.train_per_class)
    test_y = np.repeat(np.arange(c), spec.test_per_class)
    train_f, test_f = draw(train_y), draw(test_y)
    sizes = np.maximum(
        2, np.round(spec.pool_per_class * rng.lognormal(0.0, spec.imbalance, c))
    ).astype(np.int64)
    pool_true = np.repeat(np.arange(c), sizes)
    offset = spec.shift * _unit(rng.standard_normal((c, d)))
    pool_f = draw(pool_true, offset, spec.style_skew)
    caption = pool_true.copy()
    wrong = rng.random(len(caption)) < spec.label_noise
    caption[wrong] = rng.integers(0, c, int(wrong.sum()))
    kept = np.argmax(pool_f @ text.T, axis=1) == caption
    return World(spec, text, train_f, train_y, test_f, test_y, pool_f, caption, pool_true, kept)


def standard_specs(n: int = 24, seed: int = 0) -> list[WorldSpec]:
    """``n`` worlds spanning the settings the evaluation meets: 10 to 100 classes, text heads
    from good to poor, 10-50% caption noise, balanced to heavily imbalanced pools of 20 to 300
    images per class, pool images up to half a class apart from the task's. Drawn from
    ``seed``."""
    rng = np.random.default_rng([seed, 18])

    def one() -> WorldSpec:
        return WorldSpec(
            classes=int(rng.choice([10, 30, 50, 100])),
            dim=int(rng.choice([64, 128])),
            spread=float(rng.uniform(1.3, 2.3)),
            text_noise=float(rng.uniform(0.3, 0.9)),
            gap=float(rng.uniform(0.5, 1.5)),
            label_noise=float(rng.uniform(0.1, 0.5)),
            pool_per_class=int(rng.choice([20, 60, 150, 300])),
            imbalance=float(rng.uniform(0.0, 1.2)),
            shift=float(rng.uniform(0.0, 0.5)),
            test_per_class=100,
            train_per_class=50,
            seed=int(rng.integers(0, 2**31)),
        )

    return [one() for _ in range(n)]


def stress_specs(n: int = 24, seed: int = 0) -> list[WorldSpec]:
    """:func:`standard_specs` with nuisance styles: six shared directions as strong as the
    classes' own, each class's pool images favouring one of them (LAION's product shots,
    stock photos), the task's images spread evenly. Where the rules' assumptions break."""
    rng = np.random.default_rng([seed, 19])
    return [
        replace(
            s,
            styles=6,
            style_strength=float(rng.uniform(0.5, 1.0)),
            style_skew=float(rng.uniform(0.3, 0.8)),
        )
        for s in standard_specs(n, seed)
    ]


def transductive_rows(world: World, k: int = 10) -> np.ndarray:
    """Pool rows of the transductive selection: the union of every test image's ``k`` nearest
    kept pool images (as the transductive filter over the CLIP filter's decision keeps)."""
    kept = np.flatnonzero(world.kept)
    kk = min(k, len(kept))
    chosen = []
    for s in range(0, len(world.test_feats), 1024):  # bounded memory: 1024 rows of similarities
        sims = world.test_feats[s : s + 1024] @ world.pool_feats[kept].T
        chosen.append(np.argpartition(-sims, kk - 1, axis=1)[:, :kk])
    nearest = np.concatenate(chosen)
    return np.unique(kept[nearest])


def world_task(world: World, protocol: str = "zero-shot priming") -> Task:
    """The evaluation's :class:`~pipeline.evaluate.protocols.Task` of a world, with one priming
    set: the kept pool (``zero-shot priming``) or the transductive selection over it
    (``transductive priming``); the whole pool before the filter is the alpha sample."""
    if protocol == TRANSDUCTIVE_PRIMING:
        head = np.zeros(len(world.pool_labels), bool)
        head[transductive_rows(world)] = True
    else:
        head = world.kept
    priming = Priming(
        protocol,
        world.pool_feats[head],
        world.pool_labels[head],
        world.pool_feats,
        world.pool_labels,
        head,
    )
    w = world
    return Task(
        w.train_feats,
        w.train_labels,
        w.test_feats,
        w.test_labels,
        w.text,
        None,
        w.spec.classes,
        [priming],
        "world",
    )


def hindsight(world: World, priming: Priming, grid: np.ndarray) -> np.ndarray:
    """Test accuracy of every alpha in ``grid`` with ``priming``'s head: what the best alpha,
    chosen with test labels, would score."""
    sums = class_sums(priming.feats, priming.labels, world.spec.classes)
    return np.array(
        [
            np.mean(
                predict(world.test_feats, weights_from_sums(world.text, sums, a))
                == world.test_labels
            )
            for a in grid
        ]
    )
