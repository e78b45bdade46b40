"""``primer demo``: the whole pipeline, offline, on a small corpus made here.

The target task is Fashion-MNIST (Debian's ``dataset-fashion-mnist``): an ImageFolder of its
test split's images (a seeded few per class for ``train``, more for ``test``), all in the
washed-out ``faded`` style of :mod:`pipeline.demo.data`, which the model never saw (a
distribution shift). The "LAION" corpus is a LAION-2B-en-schema parquet whose captions read
like alt text, most naming a class (with synonyms and some label noise, as in real data),
whose image URLs point at a loopback image server started for the run (Fashion-MNIST
training images in both styles, scikit-image photos, and a few broken URLs). The model is
``primer-demo-vit``, a small CLIP trained by ``scripts/train_demo_model.py`` on other
Fashion-MNIST images (``DEMO_SPLIT``) and shipped in ``conf/models/``; ``--pretrained none``
runs the same architecture with untrained, seeded weights.

Everything is seeded, so two runs give the same subset; the server's port is part of every
URL (and so of every uid), which is why it is fixed (``--port``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np
import pyarrow as pa

from pipeline.core import io
from pipeline.core.config import CONF_DIR
from pipeline.demo.data import DEMO_SPLIT, SHIFT_STYLE, stylise, web_caption
from pipeline.demo.imageserver import FASHION_CLASSES, ImageServer, encode_image, load_fashion_mnist
from pipeline.demo.synthetic import laion_table, make_captions

log = logging.getLogger(__name__)

DEMO_DATASET = "FashionMNIST"
DEMO_MODEL = "primer-demo-vit"
# Trained by scripts/train_demo_model.py on DEMO_SPLIT.model_train (its recipe beside it).
DEMO_CHECKPOINT = str(CONF_DIR / "models" / f"{DEMO_MODEL}.pt")
# Share of the pool's Fashion-MNIST images shown in the task's shifted style (most: zero-shot
# priming then has images of that style to find, and the pool rule for alpha to score).
POOL_SHIFTED_SHARE = 0.7


def image_path(split: str, index: int, style: str = "photo", ext: str = "jpg") -> str:
    """The image server's path of a Fashion-MNIST image in ``style``."""
    if style == "photo":
        return f"fmnist/{split}/{index}.{ext}"
    return f"fmnist/{split}/{style}/{index}.{ext}"


def demo_metadata(base_url: str, rows: int = 1200, seed: int = 0) -> pa.Table:
    """The demo's LAION-2B-en-schema metadata; every URL is under ``base_url`` (loopback).

    Images come from ``DEMO_SPLIT.pool`` only. About 70% of rows show an image of a class
    (:data:`POOL_SHIFTED_SHARE` of them in the test split's shifted style) with a caption
    from :func:`pipeline.demo.data.web_caption` (some name a wrong class or none), 5% name
    two classes (ambiguous), the rest are unrelated alt text; a few URLs fail (404, truncated
    image, HTML page, X-Robots-Tag: noai, connection reset).
    """
    rng = np.random.default_rng(seed)
    _, labels = load_fashion_mnist(DEMO_SPLIT.source)
    pool = np.asarray(DEMO_SPLIT.pool)
    by_class = [pool[labels[pool] == c] for c in range(len(FASHION_CLASSES))]
    src = DEMO_SPLIT.source
    urls, captions = [], []
    n_named = int(rows * 0.70)
    n_ambiguous = int(rows * 0.05)
    n_broken = 12
    n_plain = rows - n_named - n_ambiguous - n_broken

    def style() -> str:
        return SHIFT_STYLE if rng.random() < POOL_SHIFTED_SHARE else "photo"

    for _ in range(n_named):
        label = int(rng.integers(len(FASHION_CLASSES)))
        shown = style()
        idx = int(rng.choice(by_class[label]))
        urls.append(f"{base_url}/{image_path(src, idx, shown)}")
        captions.append(web_caption(rng, label, shown)[0])
    for _ in range(n_ambiguous):
        a, b = rng.choice(len(FASHION_CLASSES), 2, replace=False)
        idx = int(rng.choice(by_class[a]))
        urls.append(f"{base_url}/{image_path(src, idx)}")
        captions.append(f"{FASHION_CLASSES[a]} and {FASHION_CLASSES[b]} outfit set")
    plain, _ = make_captions(n_plain, (), seed=seed)
    photos = DEMO_SPLIT.pool_photos
    for i, cap in enumerate(plain):
        if i % 3 == 0:
            urls.append(f"{base_url}/skimage/{photos[i % len(photos)]}.jpg")
        else:
            urls.append(f"{base_url}/{image_path(src, int(rng.choice(pool)), style())}")
        captions.append(cap)
    broken = [
        "status/404",
        "status/500",
        f"truncated/{image_path(src, int(pool[7]))}",
        "notimage/page.jpg",
        f"noai/{image_path(src, int(pool[8]))}",
        "reset/x.jpg",
    ]
    for i in range(n_broken):
        urls.append(f"{base_url}/{broken[i % len(broken)]}?i={i}")
        captions.append(web_caption(rng, i % len(FASHION_CLASSES))[0])
    order = rng.permutation(rows)
    return laion_table(
        rows,
        schema="laion2b",
        seed=seed,
        urls=[urls[i] for i in order],
        captions=[captions[i] for i in order],
    )


def write_task_imagefolder(
    root: str, train_per_class: int = 16, test_per_class: int = 60, seed: int = 0
) -> None:
    """The target task as ``root/{train,test}/<class>/<index>.png`` (disjoint, seeded).

    Both splits are images of ``DEMO_SPLIT.task_split`` in the shifted style, which the model
    never saw: the task is shifted from the model's training data, as real target tasks are
    from LAION, and its shots come from the distribution of its test images.
    """
    images, labels = load_fashion_mnist(DEMO_SPLIT.task_split)
    rng = np.random.default_rng(seed)
    for c, name in enumerate(FASHION_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for split, chosen in (
            ("train", idx[:train_per_class]),
            ("test", idx[train_per_class : train_per_class + test_per_class]),
        ):
            for i in sorted(chosen.tolist()):
                io.write_bytes(
                    os.path.join(root, split, name, f"{i:05d}.png"),
                    encode_image(stylise(images[i : i + 1], SHIFT_STYLE)[0], "png", 64),
                )


def prepare_inputs(out_dir: str, base_url: str, rows: int, seed: int) -> tuple[str, str]:
    """Write the demo's metadata and task images once (a marker makes reruns skip this)."""
    inputs = io.join(out_dir, "inputs")
    metadata, task = io.join(inputs, "laion"), io.join(inputs, "task")
    marker = io.join(inputs, f"_SUCCESS_{base_url.rsplit(':', 1)[-1]}_{rows}_{seed}")
    if io.exists(marker):
        return metadata, task
    io.remove(inputs)
    table = demo_metadata(base_url, rows, seed)
    step = -(-table.num_rows // 4)
    for i in range(4):
        io.write_parquet(table.slice(i * step, step), io.join(metadata, f"part-{i:05d}.parquet"))
    write_task_imagefolder(task, seed=seed)
    io.write_json(marker, {"rows": rows, "seed": seed, "base_url": base_url})
    return metadata, task


def demo_overrides(extra: list[str] | None = None, pretrained: str = "") -> list[str]:
    """Settings that make the demo small, fast and able to reach its loopback server.

    The model is the shipped demo checkpoint, or with ``pretrained="none"`` the same
    architecture with untrained, seeded weights.
    """
    if pretrained not in ("", "none"):
        raise ValueError(f"the demo's --pretrained takes only 'none', not {pretrained!r}")
    checkpoint = "" if pretrained == "none" else DEMO_CHECKPOINT
    return [
        "download.allow_private_addresses=true",
        "download.processes=1",
        "download.threads=16",
        "download.image_size=64",
        "download.timeout=3",
        "download.retries=0",
        "download.samples_per_shard=256",
        f"embed.model={DEMO_MODEL}",
        "embed.pretrained=none",
        f"embed.checkpoint={checkpoint}",
        "embed.device=cpu",
        "embed.batch_size=128",
        "embed.workers=1",
        "spark.master=local[2]",
        "select.min_prob=0.0",
        "select.require_agreement=false",
        "select.k=8",
        "evaluate.shots=[0, 1, 2, 5]",
        "evaluate.seeds=2",
        # The demo model maps distinct garments close together (nearest other test image at
        # cosine 0.99 and above), and a re-encoded copy above 0.999: 0.95 would drop
        # nearly every priming image as a "copy". The pool holds none (DEMO_SPLIT).
        "evaluate.neardup_threshold=0.999",
        # Its image neighbourhoods are poor (most of a task image's 10 nearest are of other
        # classes), where the neighbour-agreement rule has nothing to go on
        # (docs/evaluation.md): zero-shot priming chooses alpha over the pool alone.
        "evaluate.alpha_target=none",
        *(extra or []),
    ]


def demo_config(
    out_dir: str,
    metadata: str,
    task: str,
    extra_overrides: list[str] | None = None,
    config_file: str | None = None,
    pretrained: str = "",
) -> dict:
    """Every config section of a demo run (the demo's settings, then the user's)."""
    from pipeline.app.registry import resolve

    where = {"subset.dataset": DEMO_DATASET, "subset.metadata": metadata}
    where.update({"subset.data_root": task, "subset.run_dir": out_dir})
    overrides = [f"{k}={v}" for k, v in where.items()] + demo_overrides(extra_overrides, pretrained)
    return resolve(config_file, overrides)


def run_demo(
    out_dir: str = "data/demo",
    port: int = 8765,
    rows: int = 1200,
    seed: int = 0,
    extra_overrides: list[str] | None = None,
    redo: list[str] | None = None,
    config_file: str | None = None,
    pretrained: str = "",
) -> int:
    """Serve the images, prepare inputs, run ``primer subset``; returns the exit code.

    ``pretrained="none"``: untrained weights instead of the shipped demo model.
    """
    from pipeline.app.subset import run_subset, summary

    try:
        server = ImageServer(port=port, image_size=64)
    except OSError as e:
        log.error(
            "cannot serve demo images on 127.0.0.1:%d (%s); pass --port with a free port", port, e
        )
        return 1
    with server:
        metadata, task = prepare_inputs(out_dir, server.base_url, rows, seed)
        config = demo_config(out_dir, metadata, task, extra_overrides, config_file, pretrained)
        results = run_subset(config, redo=redo)
    sys.stdout.write(summary(results, out_dir))
    if config["embed"].weights() == "untrained":
        sys.stdout.write(
            "\nNOTE: the demo embeds with an untrained model (pretrained=none), so its accuracies are meaningless;\n"
            "it shows that every stage runs. Open the report above to look at what was retrieved.\n"
        )
    else:
        sys.stdout.write(
            f"\nThe model is {DEMO_MODEL}, a small CLIP trained here on other Fashion-MNIST images\n"
            f"(recipe: conf/models/{DEMO_MODEL}.recipe.yaml). The task's images are {SHIFT_STYLE},\n"
            "a style the model never saw: priming finds pool images in that style.\n"
            "Open the report above to see them.\n"
        )
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from pipeline.app.subset import add_redo_option

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="run the whole pipeline offline on a small bundled corpus (loopback image server)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--out", default="data/demo", help="run directory (default data/demo)")
    p.add_argument(
        "--port",
        type=int,
        default=8765,
        help="loopback port for the demo image server (default 8765)",
    )
    p.add_argument(
        "--rows", type=int, default=1200, help="metadata rows to generate (default 1200)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pretrained",
        default="",
        choices=["", "none"],
        help="none: untrained weights instead of the shipped demo model",
    )
    add_redo_option(p)
    p.set_defaults(
        func=lambda a: run_demo(
            a.out, a.port, a.rows, a.seed, a.overrides, a.redo, a.config, a.pretrained
        )
    )
