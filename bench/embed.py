"""Benchmark of stage 3: ``primer embed`` from real webdataset shards vs the bare model.

Rows (same model, batch size, device and precision):

- ``model forward``: ``encode_image`` on pre-made, pre-normalised tensors already on the
  device (the ceiling: no decode, no transfer).
- ``data path only``: the DataLoader workers reading tars and decoding/resizing images,
  with no model (the decode ceiling for this many workers).
- ``primer embed``: :func:`pipeline.embed.pool.embed_shards` end to end (tar read, decode, resize,
  host->device, forward, normalise, write), timed by the stage itself (model load excluded).

The ratio column is images/s relative to the bare forward: how much the data path costs.

Shards are written here, in a temporary directory, the way the download stage writes them
(short side 224 px, keep ratio, JPEG quality 95): Fashion-MNIST images upscaled when Debian's
``dataset-fashion-mnist`` is installed, else smooth random "photos" of realistic size (a GPU
box usually has no Fashion-MNIST).

    .venv/bin/python bench/embed.py --quick
    python bench/embed.py --model ViT-B-16 --device cuda --precision bf16 --images 20000 \\
        --shards 16 --workers 15 --batch-size 512
"""

from __future__ import annotations

import argparse
import io as _io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time

import numpy as np
from _util import add_record_flag, record, table

from pipeline.core import io
from pipeline.embed.config import EmbedConfig
from pipeline.embed.model import load_model
from pipeline.embed.pool import embed_shards
from pipeline.embed.shards import _loader, _unit_dataset, plan_units


def _smooth_photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photo-like random image: low-frequency colour field plus fine noise."""
    from PIL import Image

    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
    noise = rng.normal(0, 12, (h, w, 3)).astype(np.float32)
    return np.clip(field + noise, 0, 255).astype(np.uint8)


def _write_tar(path: str, first: int, last: int, source: str, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng([seed, first])
    fashion = None
    if source == "fashion-mnist":
        from pipeline.demo.imageserver import load_fashion_mnist

        fashion = load_fashion_mnist("train")[0]
    with tarfile.open(path, "w") as tf:
        for i in range(first, last):
            long_side = int(rng.integers(224, 400))
            h, w = (224, long_side) if i % 2 else (long_side, 224)
            if fashion is not None:
                img = Image.fromarray(fashion[i % len(fashion)]).convert("RGB")
                img = img.resize((w, h), Image.BICUBIC)
            else:
                img = Image.fromarray(_smooth_photo(rng, h, w))
            buf = _io.BytesIO()
            img.save(buf, format="JPEG", quality=95)
            meta = {"uid": f"{i:032x}", "label": i % 10, "class_name": str(i % 10)}
            for ext, data in (
                ("jpg", buf.getvalue()),
                ("txt", b"a photo"),
                ("json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(f"{i:010d}.{ext}")
                info.size = len(data)
                tf.addfile(info, _io.BytesIO(data))


def make_shards(out: str, n_images: int, n_shards: int, source: str, seed: int = 0) -> str:
    """Write ``n_images`` samples (jpg/txt/json) in ``n_shards`` tars, one process per tar
    (reuses tars already there); returns the image source used."""
    from concurrent.futures import ProcessPoolExecutor

    if source in ("auto", "fashion-mnist"):
        try:
            from pipeline.demo.imageserver import load_fashion_mnist

            load_fashion_mnist("train")
            source = "fashion-mnist"
        except (FileNotFoundError, OSError):
            if source == "fashion-mnist":
                raise
            source = "synthetic"
    per = -(-n_images // n_shards)
    os.makedirs(out, exist_ok=True)
    jobs = []
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for s in range(n_shards):
            path = os.path.join(out, f"{s:05d}.tar")
            if not os.path.exists(path):
                first, last = s * per, min(n_images, (s + 1) * per)
                jobs.append(pool.submit(_write_tar, path, first, last, source, seed))
        for j in jobs:
            j.result()
    return source


def bare_forward(cfg: EmbedConfig, n_images: int) -> float:
    """images/s of ``encode_image`` on device-resident tensors (after warm-up)."""
    import torch

    from pipeline.embed.model import _autocast

    lm = load_model(cfg)
    s = lm.image_size
    x = torch.randn(cfg.batch_size, 3, s, s, device=lm.device)
    if lm.device.startswith("cuda"):
        x = x.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if lm.device.startswith("cuda") else (lambda: None)
    n_batches = max(2, n_images // cfg.batch_size)
    with torch.inference_mode(), _autocast(lm):
        for _ in range(2):
            lm.model.encode_image(x)
        sync()
        t0 = time.perf_counter()
        for _ in range(n_batches):
            f = lm.model.encode_image(x)
            torch.nn.functional.normalize(f.float(), dim=-1).cpu()
        sync()
    return n_batches * cfg.batch_size / (time.perf_counter() - t0)


def data_path_only(cfg: EmbedConfig, shards: str) -> float:
    """images/s of the loader (tar read + decode + resize in workers), no model."""
    lm = load_model(cfg)
    tars = io.list_files(shards, suffixes=(".tar",))
    units = plan_units([(t.rsplit("/", 1)[-1][:-4], t) for t in tars], cfg.workers)
    loader = _loader(
        _unit_dataset(units, lm, cfg.batch_size),
        min(cfg.workers, len(units)),
        lm.device.startswith("cuda"),
    )
    n, t0 = 0, time.perf_counter()
    for _unit, uids, *_ in loader:
        n += len(uids)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run (< 60 s on 2 CPU cores)")
    ap.add_argument("--model", default="primer-tiny-vit")
    ap.add_argument("--pretrained", default="none", help="weights are irrelevant to speed")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--source", choices=["auto", "fashion-mnist", "synthetic"], default="auto")
    ap.add_argument("--keep", help="write the shards here and keep them (else a temp dir)")
    add_record_flag(ap)
    args = ap.parse_args()
    if args.quick:
        args.images, args.shards = min(args.images, 2000), min(args.shards, 4)
    logging.basicConfig(level=logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    cfg = EmbedConfig(
        model=args.model,
        pretrained=args.pretrained,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    tmp = tempfile.mkdtemp(prefix="bench-embed-")
    shards = args.keep or os.path.join(tmp, "shards")
    try:
        t0 = time.perf_counter()
        source = make_shards(shards, args.images, args.shards, args.source)
        make_s = time.perf_counter() - t0
        forward = bare_forward(cfg, args.images)
        decode = data_path_only(cfg, shards)
        stats = embed_shards(cfg, shards, os.path.join(tmp, "emb"))
        e2e = stats["embedded"] / stats["seconds_this_run"]
        lm_meta = json.load(open(os.path.join(tmp, "emb", "meta.json")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [
        {"path": "model forward (device tensors)", "images/s": forward, "ratio": 1.0},
        {"path": "data path only (workers)", "images/s": decode, "ratio": decode / forward},
        {"path": "primer embed (end to end)", "images/s": e2e, "ratio": e2e / forward},
    ]
    what = (
        f"model={args.model} device={lm_meta.get('precision')}@{args.device} "
        f"batch={args.batch_size} workers={args.workers} images={stats['embedded']} "
        f"shards={args.shards} source={source}"
    )
    print(f"{what} (written in {make_s:.1f} s)")
    print(
        f"embed timings: wait {stats['wait_s']:.2f} s, compute {stats['compute_s']:.2f} s, "
        f"write {stats['write_s']:.2f} s of {stats['seconds_this_run']:.2f} s"
    )
    print(table(rows, ["path", "images/s", "ratio"]))
    record("embed", rows, ["path", "images/s", "ratio"], args, note=what)


if __name__ == "__main__":
    main()
