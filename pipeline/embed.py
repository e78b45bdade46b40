"""Stage 3: open_clip embeddings of pool shards, target-task images and class prompts.

- ``primer embed``: webdataset shards (the download stage's) -> one embedding shard per tar.
  DataLoader workers read and decode whole shards (``shards[worker::workers]``) and hand the
  model batches; the model runs under ``torch.inference_mode`` and bf16/fp16 autocast on
  CUDA. A sample that does not decode is counted and skipped with its uid recorded; the shard
  still completes. Completed shards (``S.done``) are skipped on rerun.
- ``primer embed-task``: a target task's train or test images (:mod:`pipeline.tasks`).
- ``primer embed-text``: every template x class prompt, and the CuPL-style descriptions when
  the dataset config names a file; one row per prompt so heads can be rebuilt without the model.

Several GPUs: one process per GPU, each taking ``shards[rank::world_size]`` (``RANK`` /
``WORLD_SIZE`` from torchrun, or ``--rank/--world-size``); every rank writes its own shards
and the last one to finish writes ``_SUCCESS`` once all shards are done.

Weights: an open_clip pretrained tag, a local checkpoint (``torch.load(weights_only=True)``, so
a pickle that would run code is refused), or ``none`` for untrained weights initialised from
``seed`` (pool and task runs then embed into the same space).
"""

from __future__ import annotations

import argparse
import hashlib
import io as _io
import logging
import os
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import embeddings as E
from pipeline import io
from pipeline.config import CONF_DIR, load_dataset, stage_config

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_MEMBER_BYTES = 64 * 2**20


@dataclass(frozen=True)
class EmbedConfig:
    """Settings of the embed stages (section ``embed``)."""

    model: str = "ViT-B-16"
    pretrained: str = "laion2b_s34b_b88k"
    checkpoint: str = ""
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 256
    workers: int = 4
    seed: int = 0
    task_shard_size: int = 10000

    def __post_init__(self) -> None:
        problems = []
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append("device must be auto, cpu or cuda")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append("precision must be auto, fp32, bf16 or fp16")
        if self.batch_size < 1 or self.workers < 0 or self.task_shard_size < 1:
            problems.append("batch_size and task_shard_size must be >= 1, workers >= 0")
        if self.checkpoint and self.pretrained not in ("", "none"):
            problems.append("give either pretrained or checkpoint, not both")
        if problems:
            raise ValueError("; ".join(problems))


# ---------------------------------------------------------------------- model


@dataclass
class LoadedModel:
    model: object
    preprocess: object
    tokenizer: object
    device: str
    dtype: object  # torch dtype for autocast, or None for fp32
    meta: dict


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(cfg: EmbedConfig) -> LoadedModel:
    """Build the open_clip model with its preprocessing and tokenizer.

    Raises :class:`pipeline.io.InputError` with what to do when a tag cannot be loaded (no
    network, unknown tag) or a checkpoint is missing, unsafe or does not fit the model.
    """
    import torch

    from pipeline.torchcompat import import_open_clip

    open_clip = import_open_clip()
    open_clip.add_model_config(str(CONF_DIR / "models"))
    if cfg.model not in open_clip.list_models():
        raise io.InputError(f"unknown open_clip model {cfg.model!r} (see open_clip.list_models())")
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise io.InputError("device cuda requested but torch sees no GPU; use --device cpu")
    precision = cfg.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.startswith("cuda") else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    meta = {"model": cfg.model, "pretrained": None, "checkpoint_sha256": None, "untrained": False, "seed": cfg.seed, "precision": precision}
    # Seeded before creation: untrained weights are then identical in every process.
    torch.manual_seed(cfg.seed)
    if cfg.checkpoint:
        if not os.path.exists(cfg.checkpoint):
            raise io.InputError(f"checkpoint {cfg.checkpoint!r} does not exist")
        model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=None)
        try:
            state = torch.load(cfg.checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:
            raise io.InputError(
                f"checkpoint {cfg.checkpoint!r} refused: it is not a plain tensor state dict ({type(e).__name__}). "
                "Only weights_only-loadable files are accepted; a pickle that carries code is never executed."
            ) from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise io.InputError(f"checkpoint {cfg.checkpoint!r} does not fit model {cfg.model}: {str(e)[:300]}") from None
        meta["checkpoint_sha256"] = file_sha256(cfg.checkpoint)
    elif cfg.pretrained in ("", "none"):
        model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=None)
        meta["untrained"] = True
        log.warning("embedding with UNTRAINED %s weights (seed %d): similarities and accuracies are meaningless", cfg.model, cfg.seed)
    else:
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=cfg.pretrained)
        except Exception as e:
            raise io.InputError(
                f"could not load open_clip weights {cfg.model}/{cfg.pretrained} ({type(e).__name__}: {str(e)[:200]}). "
                "On a networked machine open_clip downloads them; offline, pre-fill the Hugging Face cache, pass "
                "--checkpoint PATH, or --pretrained none for untrained weights."
            ) from None
        meta["pretrained"] = cfg.pretrained
    model.eval().to(device)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    meta["embed_dim"] = int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) is not None else None
    meta["preprocess"] = repr(preprocess)
    return LoadedModel(model, preprocess, open_clip.get_tokenizer(cfg.model), device, dtype, meta)


def _autocast(lm: LoadedModel):
    import contextlib

    import torch

    if lm.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if lm.device.startswith("cuda") else "cpu", dtype=lm.dtype)


def encode_images(lm: LoadedModel, batch) -> np.ndarray:
    """float16 unit embeddings of a preprocessed image batch."""
    import torch

    with torch.inference_mode(), _autocast(lm):
        x = batch.to(lm.device, non_blocking=True)
        if lm.device.startswith("cuda"):
            x = x.contiguous(memory_format=torch.channels_last)
        f = lm.model.encode_image(x)
    f = torch.nn.functional.normalize(f.float(), dim=-1)
    return f.cpu().numpy().astype(np.float16)


def encode_texts(lm: LoadedModel, texts: list[str], batch_size: int = 256) -> np.ndarray:
    import torch

    out = []
    for i in range(0, len(texts), batch_size):
        tokens = lm.tokenizer(texts[i : i + batch_size]).to(lm.device)
        with torch.inference_mode(), _autocast(lm):
            f = lm.model.encode_text(tokens)
        out.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy().astype(np.float16))
    return np.concatenate(out) if out else np.zeros((0, lm.meta["embed_dim"] or 0), np.float16)


# ---------------------------------------------------------------------- reading shards


def iter_tar_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` per sample of a webdataset tar, read as a stream.

    Member names are untrusted: they only group members into samples (nothing is extracted to
    disk, so ``../`` names are harmless); oversized members are skipped.
    """
    fs, path = io.url_to_fs(url)
    with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tf:
        key, sample = None, {}
        for m in tf:
            if not m.isfile() or m.size > MAX_MEMBER_BYTES:
                continue
            base = m.name.rsplit("/", 1)[-1]
            k, _, ext = base.partition(".")
            k = m.name[: len(m.name) - len(base)] + k
            if key is not None and k != key:
                yield key, sample
                sample = {}
            key = k
            sample[ext.lower()] = tf.extractfile(m).read()  # type: ignore[union-attr]
        if key is not None:
            yield key, sample


def _decode(preprocess, data: bytes):
    from PIL import Image

    with Image.open(_io.BytesIO(data)) as im:
        im.draft("RGB", (512, 512))  # JPEG: decode at reduced scale when the image is large
        return preprocess(im.convert("RGB"))


def _shard_batches(shards: list[tuple[str, str]], preprocess, batch_size: int):
    """An IterableDataset of ``(shard, uids, labels, tensor|None, errors, last)``; each
    DataLoader worker reads whole shards (``shards[worker::workers]``)."""
    import torch

    class ShardBatches(torch.utils.data.IterableDataset):
        def __iter__(self):
            return _iter_shard_batches(shards, preprocess, batch_size)

    return ShardBatches()


def _iter_shard_batches(shards, preprocess, batch_size):
    """Read, decode and batch samples; a bad image is a recorded error, not a failed shard.

    A shard's samples are sorted by uid before batching: the downloader's threads write them
    in completion order, and sorting makes rows (and batch composition, hence every float)
    the same on every run.
    """
    import json

    import torch

    info = torch.utils.data.get_worker_info()
    mine = shards if info is None else shards[info.id :: info.num_workers]
    for name, url in mine:
        items, errors = [], []
        try:
            for key, sample in iter_tar_samples(url):
                meta = {}
                if "json" in sample:
                    try:
                        meta = json.loads(sample["json"])
                    except ValueError:
                        meta = {}
                uid = str(meta.get("uid") or key)
                ext = next((e for e in IMAGE_EXTS if e in sample), None)
                if ext is None:
                    errors.append((uid, "no image in sample"))
                    continue
                items.append((uid, int(meta.get("label", -1)), sample[ext]))
        except (tarfile.TarError, OSError, EOFError) as e:
            errors.append(("<shard>", f"unreadable tar: {type(e).__name__}: {e}"[:200]))
        items.sort(key=lambda x: x[0])
        uids, labels, tensors = [], [], []
        for uid, label, data in items:
            try:
                tensors.append(_decode(preprocess, data))
            except Exception as e:  # a bad image is a counted row, not a failed shard
                errors.append((uid, f"{type(e).__name__}: {e}"[:200]))
                continue
            uids.append(uid)
            labels.append(label)
            if len(tensors) == batch_size:
                yield name, uids, labels, torch.stack(tensors), errors, False
                uids, labels, tensors, errors = [], [], [], []
        yield name, uids, labels, torch.stack(tensors) if tensors else None, errors, True


def _loader(dataset, workers: int, pin: bool):
    import torch

    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    r = rank if rank is not None else int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    w = world if world is not None else int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= r < w:
        raise io.InputError(f"rank {r} is outside world size {w}")
    return r, w


def _finish(out: str, expected: list[str], meta: dict, stats_extra: dict) -> bool:
    """Write meta/stats and ``_SUCCESS`` once every expected shard is done; True if written."""
    done = set(E.completed_shards(out))
    if not set(expected) <= done:
        log.info("%d of %d shards done; _SUCCESS waits for the other ranks", len(done & set(expected)), len(expected))
        return False
    rows = failed = 0
    failures = []
    for s in expected:
        d = io.read_json(io.join(out, f"{s}.done"))
        rows += d.get("rows", 0)
        failed += len(d.get("errors", []))
        failures.extend(d.get("errors", [])[:20])
    io.write_json(io.join(out, E.META), meta)
    io.write_json(io.join(out, "stats.json"), {"shards": len(expected), "embedded": rows, "failed": failed, "failures": failures[:200], **stats_extra})
    io.mark_done(out, {"rows": rows})
    return True


def embed_shards(cfg: EmbedConfig, shards_url: str, out: str, overwrite: bool = False, rank: int | None = None, world: int | None = None) -> dict:
    """Embed every webdataset shard of ``shards_url`` into ``out``; returns the stats."""
    if not io.prepare_output(out, overwrite):
        return io.read_json(io.join(out, "stats.json"))
    from tqdm import tqdm

    rank, world = _rank_world(rank, world)
    tars = io.list_files(shards_url, suffixes=(".tar",))
    names = [t.rsplit("/", 1)[-1][: -len(".tar")] for t in tars]
    mine = list(zip(names, tars))[rank::world]
    done = set(E.completed_shards(out))
    todo = [(n, t) for n, t in mine if n not in done]
    log.info("embed: %d shards (%d done, %d for rank %d/%d) -> %s", len(tars), len(done), len(todo), rank, world, out)
    lm = load_model(cfg)
    meta = {**lm.meta, "kind": "image", "source": shards_url}
    t0 = time.perf_counter()
    images = 0
    if todo:
        pending: dict[str, dict] = {}
        ds = _shard_batches(todo, lm.preprocess, cfg.batch_size)
        workers = min(cfg.workers, len(todo))
        with tqdm(total=len(todo), desc="embed shards", unit="shard", disable=None) as bar:
            for name, uids, labels, batch, errors, last in _loader(ds, workers, lm.device.startswith("cuda")):
                acc = pending.setdefault(name, {"uids": [], "labels": [], "feats": [], "errors": []})
                acc["errors"].extend(errors)
                if batch is not None:
                    acc["feats"].append(encode_images(lm, batch))
                    acc["uids"].extend(uids)
                    acc["labels"].extend(labels)
                    images += len(uids)
                if last:
                    acc = pending.pop(name)
                    feats = np.concatenate(acc["feats"]) if acc["feats"] else np.zeros((0, meta["embed_dim"]), np.float16)
                    E.write_shard(out, name, acc["uids"], acc["labels"], feats, stats={"errors": acc["errors"]})
                    bar.update(1)
    elapsed = time.perf_counter() - t0
    _finish(out, names, meta, {"images_per_s_this_run": round(images / elapsed, 1) if elapsed > 0 else None})
    return io.read_json(io.join(out, "stats.json")) if io.is_done(out) else {"embedded": images}


class _TaskImages:
    def __init__(self, items, preprocess):
        self.items, self.preprocess = items, preprocess

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        import torch

        path = self.items[i].path
        try:
            with open(path, "rb") as f:
                return i, _decode(self.preprocess, f.read()), ""
        except Exception as e:
            return i, torch.zeros(3, 1, 1), f"{type(e).__name__}: {e}"[:200]


def _collate(batch):
    import torch

    ok = [b for b in batch if not b[2]]
    bad = [(b[0], b[2]) for b in batch if b[2]]
    return [b[0] for b in ok], (torch.stack([b[1] for b in ok]) if ok else None), bad


def embed_task(cfg: EmbedConfig, dataset: str, split: str, root: str, out: str, layout: str | None = None, overwrite: bool = False, download: bool = False) -> dict:
    """Embed a target task's ``split`` images into shards of ``task_shard_size`` images."""
    if not io.prepare_output(out, overwrite):
        return io.read_json(io.join(out, "stats.json"))
    import torch
    from tqdm import tqdm

    from pipeline.tasks import list_task_images, torchvision_download

    spec = load_dataset(dataset)
    if download:
        torchvision_download(layout or spec.layout, root, split)
    items = list_task_images(spec, root, split, layout, seed=cfg.seed)
    lm = load_model(cfg)
    meta = {**lm.meta, "kind": "image", "source": root, "split": split, "dataset": spec.name, "num_classes": spec.num_classes}
    names = []
    for s, start in enumerate(range(0, len(items), cfg.task_shard_size)):
        name = f"{s:05d}"
        names.append(name)
        if E.shard_done(out, name):
            continue
        chunk = items[start : start + cfg.task_shard_size]
        ds = _TaskImages(chunk, lm.preprocess)
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=_collate)
        uids, labels, paths, feats, errors = [], [], [], [], []
        for idx, batch, bad in tqdm(loader, desc=f"embed {split} {name}", unit="batch", disable=None):
            errors.extend((chunk[i].rel, err) for i, err in bad)
            if batch is None:
                continue
            feats.append(encode_images(lm, batch))
            uids.extend(chunk[i].uid(split) for i in idx)
            labels.extend(chunk[i].label for i in idx)
            paths.extend(chunk[i].rel for i in idx)
        f = np.concatenate(feats) if feats else np.zeros((0, meta["embed_dim"]), np.float16)
        E.write_shard(out, name, uids, labels, f, extra={"path": pa.array(paths, pa.string())}, stats={"errors": errors})
    _finish(out, names, meta, {"images": len(items)})
    return io.read_json(io.join(out, "stats.json"))


def embed_text(cfg: EmbedConfig, dataset: str, out: str, overwrite: bool = False) -> dict:
    """Embed every prompt (templates x classes, then descriptions) into one shard ``text``."""
    if not io.prepare_output(out, overwrite):
        return io.read_json(io.join(out, "stats.json"))
    spec = load_dataset(dataset)
    labels, kinds, prompts = [], [], []
    for c in range(spec.num_classes):
        for p in spec.prompts(c):
            labels.append(c)
            kinds.append("template")
            prompts.append(p)
    for c in range(spec.num_classes):
        for p in spec.class_descriptions(c):
            labels.append(c)
            kinds.append("description")
            prompts.append(p)
    lm = load_model(cfg)
    feats = encode_texts(lm, prompts, cfg.batch_size)
    uids = [io.make_uid(f"text:{k}:{lab}", p) for lab, k, p in zip(labels, kinds, prompts)]
    E.write_shard(out, "text", uids, labels, feats, extra={"kind": kinds, "prompt": prompts})
    meta = {**lm.meta, "kind": "text", "dataset": spec.name, "num_classes": spec.num_classes, "classnames": list(spec.classes)}
    io.write_json(io.join(out, E.META), meta)
    stats = {"prompts": len(prompts), "templates": kinds.count("template"), "descriptions": kinds.count("description")}
    io.write_json(io.join(out, "stats.json"), stats)
    io.mark_done(out, stats)
    return stats


# ---------------------------------------------------------------------- CLI


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="open_clip model name (default from config: ViT-B-16)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--pretrained", help="open_clip pretrained tag, or 'none' for untrained seeded weights")
    w.add_argument("--checkpoint", help="local checkpoint (a state dict; loaded with weights_only=True)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    p.add_argument("--out", required=True, help="output directory URL")
    p.add_argument("--overwrite", action="store_true", help="redo a complete output")


def _cfg(args: argparse.Namespace) -> EmbedConfig:
    flags = {k: getattr(args, k, None) for k in ("model", "pretrained", "checkpoint", "device", "precision", "batch_size", "workers")}
    if flags.get("checkpoint"):
        flags["pretrained"] = ""
    return stage_config(EmbedConfig, "embed", args.config, args.overrides, flags)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("embed", parents=[common], help="stage 3: embed webdataset shards with open_clip", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="directory URL of webdataset .tar shards")
    p.add_argument("--rank", type=int, help="this process's rank (default $RANK or 0)")
    p.add_argument("--world-size", dest="world_size", type=int, help="number of processes (default $WORLD_SIZE or 1)")
    _model_flags(p)
    p.set_defaults(func=lambda a: _report(embed_shards(_cfg(a), a.shards, a.out, a.overwrite, a.rank, a.world_size), a.out))

    p = sub.add_parser("embed-task", parents=[common], help="stage 3: embed a target task's train or test images")
    p.add_argument("--dataset", required=True, help="bundled dataset name or path.yaml")
    p.add_argument("--split", required=True, choices=["train", "test"])
    p.add_argument("--root", required=True, help="directory holding the dataset (layout from the dataset config)")
    p.add_argument("--layout", help="override the dataset config's layout")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset into --root first (needs network)")
    _model_flags(p)
    p.set_defaults(func=lambda a: _report(embed_task(_cfg(a), a.dataset, a.split, a.root, a.out, a.layout, a.overwrite, a.download), a.out))

    p = sub.add_parser("embed-text", parents=[common], help="stage 3: embed every class prompt (templates and descriptions)")
    p.add_argument("--dataset", required=True, help="bundled dataset name or path.yaml")
    _model_flags(p)
    p.set_defaults(func=lambda a: _report(embed_text(_cfg(a), a.dataset, a.out, a.overwrite), a.out))


def _report(stats: dict, out: str) -> int:
    sys.stdout.write(f"{stats} -> {out}\n")
    return 0
