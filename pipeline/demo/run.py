"""``primer demo``: the whole pipeline, offline, on a small corpus made here.

The target task is Fashion-MNIST (Debian's ``dataset-fashion-mnist``): an ImageFolder of its
test split's images (a seeded few per class for ``train``, more for ``test``). The "LAION"
corpus is a LAION-2B-en-schema parquet whose captions read like alt text, some naming a
class (with synonyms, plurals and some label noise, as in real data), whose image URLs point
at a loopback image server started for the run (Fashion-MNIST training images, scikit-image
photos, and a few broken URLs). The model is a tiny open_clip ViT with untrained, seeded
weights: the run proves the pipeline end to end; its accuracies mean nothing.

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
from pipeline.demo.imageserver import FASHION_CLASSES, ImageServer, encode_image, load_fashion_mnist
from pipeline.demo.synthetic import laion_table, make_captions

log = logging.getLogger(__name__)

DEMO_DATASET = "FashionMNIST"
DEMO_MODEL = "primer-tiny-vit"

_TEMPLATES = (
    "{Name} for women - summer collection 2021",
    "Men's {name}s | free shipping on orders over $50",
    "vintage {name} size M, cotton, black",
    "buy {name} online &amp; save",
    "{NAME} SALE 50% OFF",
    "kids {name} in grey, pack of 2",
    "Photo of a {name} on a white background",
    "new {name} by Kalomi (brand new with tags)",
)

# Words from the dataset YAML's synonyms show up in captions as in real alt text.
_SYNONYM_CAPTIONS = {
    0: "Cotton tee shirt, unisex",
    1: "Slim fit jeans for men",
    2: "Chunky knit sweater, oversized",
    7: "Running trainers, lightweight",
    9: "Leather chelsea boots",
}


def _caption(rng: np.random.Generator, label: int) -> str:
    name = FASHION_CLASSES[label]
    if label in _SYNONYM_CAPTIONS and rng.random() < 0.15:
        return _SYNONYM_CAPTIONS[label]
    t = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return t.format(
        name=name.lower() if name != "T-shirt" else name,
        Name=name.capitalize() if name != "T-shirt" else name,
        NAME=name.upper(),
    )


def demo_metadata(base_url: str, rows: int = 1200, seed: int = 0) -> pa.Table:
    """The demo's LAION-2B-en-schema metadata; every URL is under ``base_url`` (loopback).

    About 70% of rows name a class (10% of those with an image of another class: caption
    noise), 5% name two classes (ambiguous), the rest are unrelated alt text; a few URLs fail
    (404, truncated image, HTML page, X-Robots-Tag: noai, connection reset).
    """
    rng = np.random.default_rng(seed)
    _, train_labels = load_fashion_mnist("train")
    by_class = [np.flatnonzero(train_labels == c) for c in range(len(FASHION_CLASSES))]
    urls, captions = [], []
    n_named = int(rows * 0.70)
    n_ambiguous = int(rows * 0.05)
    n_broken = 12
    n_plain = rows - n_named - n_ambiguous - n_broken
    for _ in range(n_named):
        label = int(rng.integers(len(FASHION_CLASSES)))
        shown = label if rng.random() > 0.10 else int(rng.integers(len(FASHION_CLASSES)))
        idx = int(rng.choice(by_class[shown]))
        urls.append(f"{base_url}/fmnist/train/{idx}.jpg")
        captions.append(_caption(rng, label))
    for _ in range(n_ambiguous):
        a, b = rng.choice(len(FASHION_CLASSES), 2, replace=False)
        idx = int(rng.choice(by_class[a]))
        urls.append(f"{base_url}/fmnist/train/{idx}.jpg")
        captions.append(f"{FASHION_CLASSES[a]} and {FASHION_CLASSES[b]} outfit set")
    plain, _ = make_captions(n_plain, (), seed=seed)
    photos = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left")
    for i, cap in enumerate(plain):
        if i % 3 == 0:
            urls.append(f"{base_url}/skimage/{photos[i % len(photos)]}.jpg")
        else:
            urls.append(f"{base_url}/fmnist/train/{int(rng.integers(60000))}.jpg")
        captions.append(cap)
    broken = [
        "status/404",
        "status/500",
        "truncated/fmnist/train/7.jpg",
        "notimage/page.jpg",
        "noai/fmnist/train/8.jpg",
        "reset/x.jpg",
    ]
    for i in range(n_broken):
        label = i % len(FASHION_CLASSES)
        urls.append(f"{base_url}/{broken[i % len(broken)]}?i={i}")
        captions.append(_caption(rng, label))
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
    """Fashion-MNIST test images as ``root/{train,test}/<class>/<index>.png`` (disjoint, seeded)."""
    images, labels = load_fashion_mnist("test")
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
                    encode_image(images[i], "png", 64),
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


def demo_overrides(extra: list[str] | None = None) -> list[str]:
    """Settings that make the demo small, fast and able to reach its loopback server."""
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
        "embed.device=cpu",
        "embed.batch_size=128",
        "embed.workers=1",
        "spark.master=local[2]",
        "select.min_prob=0.0",
        "select.require_agreement=false",
        "select.k=8",
        "evaluate.shots=[0, 1, 2, 5]",
        "evaluate.seeds=2",
        *(extra or []),
    ]


def demo_config(
    out_dir: str,
    metadata: str,
    task: str,
    extra_overrides: list[str] | None = None,
    config_file: str | None = None,
) -> dict:
    """Every config section of a demo run (the demo's settings, then the user's)."""
    from pipeline.app.registry import resolve

    where = {"subset.dataset": DEMO_DATASET, "subset.metadata": metadata}
    where.update({"subset.data_root": task, "subset.run_dir": out_dir})
    overrides = [f"{k}={v}" for k, v in where.items()] + demo_overrides(extra_overrides)
    return resolve(config_file, overrides)


def run_demo(
    out_dir: str = "data/demo",
    port: int = 8765,
    rows: int = 1200,
    seed: int = 0,
    extra_overrides: list[str] | None = None,
    redo: list[str] | None = None,
    config_file: str | None = None,
) -> int:
    """Serve the images, prepare inputs, run ``primer subset``; returns the exit code."""
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
        config = demo_config(out_dir, metadata, task, extra_overrides, config_file)
        results = run_subset(config, redo=redo)
    sys.stdout.write(summary(results, out_dir))
    sys.stdout.write(
        "\nNOTE: the demo embeds with an untrained model (pretrained=none), so its accuracies are meaningless;\n"
        "it shows that every stage runs. Open the report above to look at what was retrieved.\n"
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
    add_redo_option(p)
    p.set_defaults(
        func=lambda a: run_demo(a.out, a.port, a.rows, a.seed, a.overrides, a.redo, a.config)
    )
