"""Train the demo's small CLIP, ``primer-demo-vit``, and write its weights and recipe.

    python scripts/train_demo_model.py            # writes conf/models/primer-demo-vit.pt

Contrastive (CLIP) training of the open_clip model ``conf/models/primer-demo-vit.json`` from
scratch on :func:`pipeline.demo.data.training_corpus`: Fashion-MNIST training images of
``DEMO_SPLIT.model_train`` (as they are: never in the demo's shifted style) and crops of
scikit-image photos, with web-like captions. The weights are saved as a float16 state dict
(``torch.load(weights_only=True)``, the path ``--checkpoint`` takes) with a recipe beside
them (``<out>.recipe.yaml``: command, data, seed, time, final loss, sha256). Seeded and
deterministic on CPU (for a given ``--threads``; one by default); CI never runs this, it
uses the shipped file.
"""

from __future__ import annotations

import argparse
import hashlib
import io as _io
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.core import io  # noqa: E402
from pipeline.core.config import CONF_DIR  # noqa: E402
from pipeline.demo.data import DEMO_SPLIT, CorpusRow, training_corpus  # noqa: E402

log = logging.getLogger("train_demo_model")

MODEL = "primer-demo-vit"
IMAGE_SIZE = 64


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; ``limit`` > 0 trains on the first ``limit`` corpus rows (tests)."""

    seed: int = 0
    epochs: int = 6
    batch_size: int = 256
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    shift_px: int = 4
    photo_share: float = 0.03
    threads: int = 1  # one thread: the same weights on any machine, whatever its core count
    limit: int = 0


def _resize(gray28: np.ndarray) -> np.ndarray:
    """``[N, 28, 28]`` -> ``[N, 64, 64]`` uint8, bicubic as the image server encodes them."""
    from PIL import Image

    return np.stack(
        [
            np.asarray(Image.fromarray(g).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))
            for g in gray28
        ]
    )


def _photo_crops(names: list[str], rng: np.random.Generator) -> np.ndarray:
    """A random square crop (30-100% of the short side) of each named scikit-image photo."""
    import skimage.data
    from PIL import Image

    cache: dict[str, Image.Image] = {}
    out = np.zeros((len(names), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, name in enumerate(names):
        if name not in cache:
            arr = getattr(skimage.data, name)()
            if arr.dtype != np.uint8:
                arr = (255 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-9)).astype(
                    np.uint8
                )
            cache[name] = Image.fromarray(arr[..., :3] if arr.ndim == 3 else arr).convert("RGB")
        img = cache[name]
        side = int(min(img.size) * rng.uniform(0.3, 1.0))
        x, y = (int(rng.integers(s - side + 1)) for s in img.size)
        crop = img.crop((x, y, x + side, y + side)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        out[i] = np.asarray(crop)
    return out


def load_images(rows: list[CorpusRow], rng: np.random.Generator):
    """The corpus as ``[N, 3, 64, 64]`` uint8 (a torch tensor)."""
    import torch

    from pipeline.demo.imageserver import load_fashion_mnist

    images, _ = load_fashion_mnist(DEMO_SPLIT.source)
    out = torch.zeros((len(rows), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    fm = [i for i, r in enumerate(rows) if r.index >= 0]
    if fm:
        grey = _resize(images[[rows[i].index for i in fm]])
        out[fm] = torch.from_numpy(grey)[:, None].expand(-1, 3, -1, -1)
    ph = [i for i, r in enumerate(rows) if r.index < 0]
    if ph:
        crops = _photo_crops([rows[i].photo for i in ph], rng)
        out[ph] = torch.from_numpy(crops).permute(0, 3, 1, 2)
    return out


def build_model(seed: int):
    """The untrained ``primer-demo-vit`` (seeded), its tokenizer and normalisation."""
    import torch

    from pipeline.core.torchcompat import import_open_clip

    open_clip = import_open_clip()
    open_clip.add_model_config(str(CONF_DIR / "models"))
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL, pretrained=None)
    mean = torch.tensor(model.visual.image_mean or open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.image_std or open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return model, open_clip.get_tokenizer(MODEL), mean, std, open_clip.ClipLoss()


def train(cfg: TrainConfig) -> tuple[dict, dict]:
    """Train from scratch; returns ``(float16 state dict, stats)`` (stats: losses per epoch,
    seconds, steps, corpus counts)."""
    import torch

    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.set_flush_denormal(True)  # denormals slow CPU training as weights settle
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    rows = training_corpus(cfg.seed, cfg.photo_share)
    if cfg.limit:
        rows = rows[: cfg.limit]
    rng = np.random.default_rng(cfg.seed)
    images = load_images(rows, rng)
    model, tokenizer, mean, std, loss_fn = build_model(cfg.seed)
    tokens = tokenizer([r.caption for r in rows])
    steps_per_epoch = max(1, len(rows) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    log.info("training %s on %d images, %d steps", MODEL, len(rows), total)
    model.train()
    losses, step = [], 0
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(rows))
        running = 0.0
        for b in range(steps_per_epoch):
            idx = torch.from_numpy(order[b * cfg.batch_size : (b + 1) * cfg.batch_size])
            x = images[idx]
            # Augmentation: one shift for the batch (borders are plain background), flips.
            dy, dx = (int(v) for v in rng.integers(-cfg.shift_px, cfg.shift_px + 1, 2))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            x = (x.float() / 255 - mean) / std
            warm = min(1.0, (step + 1) / cfg.warmup_steps)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / total))
            img_f, txt_f, scale = model(x, tokens[idx])
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            running += loss.item()
            step += 1
        losses.append(round(running / steps_per_epoch, 4))
        log.info("epoch %d: loss %.4f (%.0f s)", epoch + 1, losses[-1], time.perf_counter() - t0)
    model.eval()
    state = {
        k: (v.detach().half() if v.is_floating_point() else v.detach())
        for k, v in model.state_dict().items()
    }
    counts = {"fashion_mnist": sum(r.index >= 0 for r in rows)}
    counts["scikit_image_crops"] = len(rows) - counts["fashion_mnist"]
    stats = {
        "epoch_losses": losses,
        "final_loss": losses[-1] if losses else None,
        "steps": step,
        "seconds": round(time.perf_counter() - t0, 1),
        "images": counts,
        # The time depends on what else the machine runs: its cores and load say how busy.
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": load},
    }
    return state, stats


def save(state: dict, stats: dict, cfg: TrainConfig, out: str, command: str) -> None:
    """Write the state dict and, beside it, ``<out minus .pt>.recipe.yaml``."""
    import open_clip
    import torch
    import yaml

    buf = _io.BytesIO()
    torch.save(state, buf)
    raw = buf.getvalue()
    io.write_bytes(out, raw)
    recipe = {
        "model": MODEL,
        "weights": Path(out).name,
        "sha256": hashlib.sha256(raw).hexdigest(),
        "bytes": len(raw),
        "dtype": "float16 state dict (torch.load(weights_only=True))",
        "command": command,
        "seed": cfg.seed,
        "data": {
            "fashion_mnist": f"split {DEMO_SPLIT.source}, indices {DEMO_SPLIT.model_train.start}"
            f"..{DEMO_SPLIT.model_train.stop - 1} (pipeline.demo.data.DEMO_SPLIT.model_train)",
            "photos": list(DEMO_SPLIT.model_photos),
            "images": stats["images"],
            "captions": "pipeline.demo.data.web_caption: templates, synonyms, noise words; "
            "10% name a random class, 10% name none",
        },
        "training": asdict(cfg),
        "result": {
            "final_loss": stats["final_loss"],
            "epoch_losses": stats["epoch_losses"],
            "steps": stats["steps"],
            "seconds": stats["seconds"],
            "machine": stats["machine"],
        },
        "environment": {
            "torch": str(torch.__version__),
            "open_clip": open_clip.__version__,
            "python": platform.python_version(),
        },
    }
    recipe_path = out.removesuffix(".pt") + ".recipe.yaml"
    io.write_bytes(recipe_path, yaml.safe_dump(recipe, sort_keys=False).encode("utf-8"))
    log.info("wrote %s (%d bytes) and %s", out, len(raw), recipe_path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(CONF_DIR / "models" / f"{MODEL}.pt"))
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    state, stats = train(cfg)
    command = "python scripts/train_demo_model.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    save(state, stats, cfg, args.out, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
