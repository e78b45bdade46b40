"""Stage 3: open_clip embeddings of pool shards, target-task images and class prompts.

- ``primer embed``: webdataset shards (the download stage's) -> one embedding shard per tar,
  same name. DataLoader workers read the tars and decode images; the model runs in large
  batches under ``torch.inference_mode`` and bf16/fp16 autocast on CUDA. A sample that does
  not decode is counted and skipped with its uid recorded; the shard still completes.
  Completed shards (``S.done``) are skipped on rerun.
- ``primer embed-task``: a target task's train or test images (:mod:`pipeline.embed.tasks`).
- ``primer embed-text``: every template x class prompt, and the CuPL-style descriptions when
  the dataset config names a file; one row per prompt so heads can be rebuilt without the model.

Data path. Workers stop at uint8 ``[3, H, W]`` crops (open_clip's resize and centre crop);
the float conversion and normalisation run on the model's device, which is bit-identical to
open_clip's ``ToTensor`` + ``Normalize`` and moves a quarter of the bytes between processes.
When there are fewer tars than workers, each tar is split into ``parts`` interleaved sample
sets, each read by its own worker, so every worker decodes (re-reading a tar's bytes is cheap
next to decoding its images).

Several GPUs: one process per GPU, each taking ``shards[rank::world_size]`` (``RANK`` /
``WORLD_SIZE`` / ``LOCAL_RANK`` from torchrun, or ``--rank/--world-size``), on GPU
``LOCAL_RANK``. Every rank writes its own shards; whichever rank finds all shards done writes
``meta.json``, ``stats.json`` and ``_SUCCESS``. ``jobs/embed.py`` runs the same ranks as Spark
tasks that each hold one GPU.

Weights: an open_clip pretrained tag, a local checkpoint (``torch.load(weights_only=True)``, so
a pickle that would run code is refused; ``.safetensors`` too), or ``none`` for untrained
weights initialised from ``seed`` (pool and task runs then embed into the same space).
"""

from __future__ import annotations

import argparse
import hashlib
import io as _io
import json
import logging
import os
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.core import embeddings as E
from pipeline.core import io
from pipeline.core.config import CONF_DIR, load_dataset, stage_config

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_MEMBER_BYTES = 64 * 2**20
# Declared width x height above which an image is refused before it is decoded (the download
# stage's default max_image_pixels, and Pillow's warning threshold): a 100 kB PNG can declare
# 10^8 pixels and cost a worker gigabytes once decoded and converted to RGB.
MAX_IMAGE_PIXELS = 89_478_485


class ImageTooLarge(ValueError):
    """An image whose header declares more than :data:`MAX_IMAGE_PIXELS` pixels."""


# Failure rows kept in stats.json (every one is in its shard's .done marker).
MAX_FAILURES_IN_STATS = 1000


@dataclass(frozen=True)
class EmbedConfig:
    """Settings of the embed stages (section ``embed``).

    Attributes:
        model: open_clip model name (``open_clip.list_models()`` plus ``conf/models/``).
        pretrained: open_clip pretrained tag, or ``"none"``/``""`` for untrained weights.
        checkpoint: local path or URL of a state dict (``.pt``/``.bin``/``.safetensors``).
        device: ``auto`` (CUDA when torch sees a GPU), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto`` (bf16 on CUDA if supported, else fp16; fp32 on CPU), or explicit.
        batch_size: images per model forward.
        workers: DataLoader processes decoding images (0 decodes in the main process).
        seed: seeds untrained weights, so separate runs embed into the same space.
        task_shard_size: task images per output shard.
    """

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
            problems.append("device must be auto, cpu, cuda or cuda:N")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append("precision must be auto, fp32, bf16 or fp16")
        if self.batch_size < 1 or self.workers < 0 or self.task_shard_size < 1:
            problems.append("batch_size and task_shard_size must be >= 1, workers >= 0")
        if self.checkpoint and self.pretrained not in ("", "none"):
            problems.append("give either pretrained or checkpoint, not both")
        if self.precision in ("bf16", "fp16") and self.device == "cpu":
            problems.append(f"precision {self.precision} needs a CUDA device; use fp32 on CPU")
        if problems:
            raise ValueError("; ".join(problems))


# ---------------------------------------------------------------------- model


@dataclass
class LoadedModel:
    """An open_clip model ready to embed.

    ``pre_pil`` is the PIL part of open_clip's preprocessing (resize, centre crop) that
    DataLoader workers run; ``mean``/``std`` finish it on ``device`` (see :func:`encode_images`).
    """

    model: object
    preprocess: object
    tokenizer: object
    device: str
    dtype: object  # torch dtype for autocast, or None for fp32
    meta: dict
    pre_pil: object = None
    mean: object = None  # [1, 3, 1, 1] float32 tensor on device
    std: object = None
    image_size: int = 224
    extra: dict = field(default_factory=dict)


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a local file or fsspec URL."""
    h = hashlib.sha256()
    fs, p = io.url_to_fs(path)
    with fs.open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_device(device: str, local_rank: int | None = None) -> str:
    """``auto``/``cuda`` -> ``cuda:<local_rank>`` when torch sees GPUs, else ``cpu``.

    Raises :class:`pipeline.core.io.InputError` when CUDA is asked for and torch sees no GPU.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise io.InputError("device cuda requested but torch sees no GPU; use --device cpu")
    if device == "cuda":
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
        # One process per GPU: torchrun's LOCAL_RANK picks it (Spark sets CUDA_VISIBLE_DEVICES).
        device = f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


def _split_preprocess(preprocess):
    """Split open_clip's eval transform into (PIL part, mean, std), or None if unrecognised."""
    steps = list(getattr(preprocess, "transforms", []))
    names = [type(t).__name__ for t in steps]
    if len(steps) < 2 or "ToTensor" not in names[-2] or names[-1] != "Normalize":
        return None
    import torchvision.transforms as T

    return T.Compose(steps[:-2]), tuple(steps[-1].mean), tuple(steps[-1].std)


def _read_state_dict(path: str):
    import torch

    data = io.read_bytes(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(data), data
    return torch.load(_io.BytesIO(data), map_location="cpu", weights_only=True), data


def import_open_clip():
    """open_clip, importable beside both a matched torchvision and this machine's CPU torch.

    ``torchcompat.ensure_torchvision`` declares torchvision's ops when they are not yet
    registered, which is also the case for a working torchvision that was not imported yet
    (a CUDA box): its own registration then aborts the process. Importing torchvision first
    lets a working one register its ops; only when that fails does the shim step in.
    """
    import torch  # noqa: F401

    try:
        import torchvision  # noqa: F401
    except RuntimeError:  # "operator torchvision::nms does not exist": the CPU-torch case
        pass
    from pipeline.core.torchcompat import import_open_clip as _import

    return _import()


def load_model(cfg: EmbedConfig, local_rank: int | None = None) -> LoadedModel:
    """Build the open_clip model with its preprocessing and tokenizer.

    Args:
        cfg: the stage config (model, weights, device, precision, seed).
        local_rank: the GPU index for ``device`` cuda/auto; default ``$LOCAL_RANK`` or 0.

    Returns:
        A :class:`LoadedModel` in eval mode on its device; ``meta`` holds what the outputs'
        ``meta.json`` records (model, pretrained tag or checkpoint sha256, untrained, seed,
        precision, embed_dim, preprocess, image_size).

    Raises:
        pipeline.core.io.InputError: unknown model; a tag that cannot be loaded (offline, unknown);
            a checkpoint that is missing, refused by ``weights_only`` or does not fit.
    """
    import torch

    open_clip = import_open_clip()
    open_clip.add_model_config(str(CONF_DIR / "models"))
    if cfg.model not in open_clip.list_models():
        raise io.InputError(
            f"unknown open_clip model {cfg.model!r} (see open_clip.list_models() or conf/models/)"
        )
    device = resolve_device(cfg.device, local_rank)
    precision = cfg.precision
    if precision == "auto":
        on_cuda = device.startswith("cuda")
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_cuda else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    meta = {
        "model": cfg.model,
        "pretrained": None,
        "checkpoint": None,
        "checkpoint_sha256": None,
        "untrained": False,
        "seed": cfg.seed,
        "precision": precision,
    }
    # Seeded before creation: untrained weights are then identical in every process.
    torch.manual_seed(cfg.seed)
    if cfg.checkpoint:
        if not io.exists(cfg.checkpoint):
            raise io.InputError(
                f"checkpoint {cfg.checkpoint!r} does not exist; pass the path of a saved state "
                "dict, or --pretrained TAG / --pretrained none"
            )
        model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=None)
        try:
            state, raw = _read_state_dict(cfg.checkpoint)
        except Exception as e:
            raise io.InputError(
                f"checkpoint {cfg.checkpoint!r} refused: it is not a plain tensor state dict "
                f"({type(e).__name__}: {str(e)[:160]}). Only weights_only-loadable files are "
                "accepted; a pickle that carries code is never executed."
            ) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # open_clip training checkpoints
        if not isinstance(state, dict):
            raise io.InputError(f"checkpoint {cfg.checkpoint!r} holds no state dict")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise io.InputError(
                f"checkpoint {cfg.checkpoint!r} does not fit model {cfg.model}: {str(e)[:300]}"
            ) from None
        meta["checkpoint"] = cfg.checkpoint
        meta["checkpoint_sha256"] = hashlib.sha256(raw).hexdigest()
    elif cfg.pretrained in ("", "none"):
        model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=None)
        meta["untrained"] = True
        log.warning(
            "embedding with UNTRAINED %s weights (seed %d): similarities are meaningless",
            cfg.model,
            cfg.seed,
        )
    else:
        if cfg.pretrained not in open_clip.list_pretrained_tags_by_model(cfg.model):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(cfg.model)) or "none"
            raise io.InputError(
                f"open_clip has no pretrained tag {cfg.pretrained!r} for {cfg.model} (known: "
                f"{tags}); or pass --checkpoint PATH, or --pretrained none"
            )
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                cfg.model, pretrained=cfg.pretrained
            )
        except Exception as e:
            raise io.InputError(
                f"could not load open_clip weights {cfg.model}/{cfg.pretrained} "
                f"({type(e).__name__}: {str(e)[:200]}). On a networked machine open_clip "
                "downloads them; offline, copy a filled Hugging Face cache (HF_HOME) here, or "
                "pass --checkpoint PATH, or --pretrained none for untrained weights."
            ) from None
        meta["pretrained"] = cfg.pretrained
    model.eval().to(device)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    proj = getattr(model, "text_projection", None)
    if proj is not None and hasattr(proj, "shape"):
        meta["embed_dim"] = int(proj.shape[1])
    else:
        with torch.inference_mode():
            meta["embed_dim"] = int(
                model.encode_text(open_clip.tokenize(["a"]).to(device)).shape[1]
            )
    size = getattr(model.visual, "image_size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    meta["preprocess"] = repr(preprocess)
    meta["image_size"] = size
    lm = LoadedModel(model, preprocess, open_clip.get_tokenizer(cfg.model), device, dtype, meta)
    lm.image_size = size
    split = _split_preprocess(preprocess)
    if split is not None:
        pre_pil, mean, std = split
        lm.pre_pil = pre_pil
        lm.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        lm.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return lm


def _autocast(lm: LoadedModel):
    import contextlib

    import torch

    if lm.dtype is None:
        return contextlib.nullcontext()
    device_type = "cuda" if lm.device.startswith("cuda") else "cpu"
    return torch.autocast(device_type=device_type, dtype=lm.dtype)


def encode_images(lm: LoadedModel, batch) -> np.ndarray:
    """float16 L2-normalised embeddings ``[B, D]`` of a batch.

    ``batch`` is either uint8 ``[B, 3, H, W]`` crops from :func:`decode_image` (converted and
    normalised here, on the device) or float tensors already through ``lm.preprocess``.
    Normalisation to unit length happens in float32, before the cast to float16.
    """
    import torch

    with torch.inference_mode():
        x = batch.to(lm.device, non_blocking=True)
        if x.dtype == torch.uint8:
            # Same arithmetic as ToTensor (x/255) then Normalize ((x-mean)/std), in fp32.
            x = (x.float().div_(255) - lm.mean) / lm.std
        if lm.device.startswith("cuda"):
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(lm):
            f = lm.model.encode_image(x)
        f = torch.nn.functional.normalize(f.float(), dim=-1)
        return f.cpu().numpy().astype(np.float16)


def encode_texts(lm: LoadedModel, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """float16 L2-normalised text embeddings ``[len(texts), D]``, in input order."""
    import torch

    out = []
    for i in range(0, len(texts), batch_size):
        tokens = lm.tokenizer(texts[i : i + batch_size]).to(lm.device)
        with torch.inference_mode(), _autocast(lm):
            f = lm.model.encode_text(tokens)
        f = torch.nn.functional.normalize(f.float(), dim=-1)
        out.append(f.cpu().numpy().astype(np.float16))
    return np.concatenate(out) if out else np.zeros((0, lm.meta["embed_dim"]), np.float16)


def decode_image(data: bytes, pre_pil, preprocess, image_size: int = 224):
    """Decode image bytes to the model's input: uint8 ``[3, S, S]`` via ``pre_pil`` when
    given, else the float tensor of the full ``preprocess``. Raises on undecodable bytes, and
    :class:`ImageTooLarge` (before decoding) above :data:`MAX_IMAGE_PIXELS`."""
    import warnings

    import torch
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(_io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e)) from None
    with im:
        w, h = im.size
        if w * h > MAX_IMAGE_PIXELS:
            raise ImageTooLarge(f"{w}x{h} pixels > {MAX_IMAGE_PIXELS} (decompression bomb?)")
        # JPEG only: decode at a reduced DCT scale when the image is far larger than needed
        # (no smaller than twice the crop, so the bicubic resize still antialiases).
        im.draft("RGB", (2 * image_size, 2 * image_size))
        if im.mode.startswith("I;16") or im.mode == "I":
            # Pillow clips 16-bit samples to 255 when converting to RGB (a nearly white
            # image); keep the high byte instead.
            grey = (np.asarray(im, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)
            rgb = Image.fromarray(grey, "L").convert("RGB")
        else:
            rgb = im.convert("RGB")
    if pre_pil is None:
        return preprocess(rgb)
    arr = np.asarray(pre_pil(rgb), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------- reading shards


def iter_tar_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` per sample of a webdataset tar (local or any fsspec URL),
    read as a stream.

    Member names are untrusted: they only group members into samples; nothing is extracted to
    disk, so ``../`` or absolute names are harmless. Non-files and members over 64 MiB are
    skipped.
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


def _sample_fields(key: str, sample: dict[str, bytes]) -> tuple[str, int, bytes | None, str]:
    """``(uid, label, image bytes or None, error)`` of one webdataset sample; ``error`` is
    empty when the sample can be embedded (a sample without json keeps its key as uid)."""
    meta: dict = {}
    err = ""
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
            if not isinstance(meta, dict):
                meta, err = {}, "json is not an object"
        except ValueError:
            err = "unreadable json"
    uid = str(meta.get("uid") or key)
    try:
        label = int(meta.get("label", -1))
    except (TypeError, ValueError):
        label, err = -1, f"label {meta.get('label')!r} is not an integer"
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return uid, label, None, f"no image in sample: members {sorted(sample)}"
    return uid, label, sample[ext], err


@dataclass(frozen=True)
class _Unit:
    """One worker's share of a tar: samples ``i`` with ``i % parts == part``."""

    name: str
    url: str
    part: int
    parts: int


def plan_units(shards: list[tuple[str, str]], workers: int) -> list[_Unit]:
    """Split tars into units so ``workers`` processes all have work: one unit per tar when
    there are at least as many tars as workers, else ``ceil(workers / tars)`` parts per tar."""
    parts = max(1, -(-workers // max(1, len(shards)))) if workers > len(shards) else 1
    return [_Unit(n, u, p, parts) for n, u in shards for p in range(parts)]


def _iter_unit_batches(units: list[_Unit], pre_pil, preprocess, image_size: int, batch_size: int):
    """Yield ``(unit, uids, labels, tensor|None, errors, last)``: batches of decoded images,
    then one ``last`` message per unit. A bad sample is an error row, not a failed shard; a tar
    that cannot be read is one ``<shard>`` error row and the rows read before it."""
    import torch

    info = torch.utils.data.get_worker_info()
    mine = units if info is None else units[info.id :: info.num_workers]
    for unit in mine:
        uids: list[str] = []
        labels: list[int] = []
        tensors: list = []
        errors: list = []
        try:
            for i, (key, sample) in enumerate(iter_tar_samples(unit.url)):
                if i % unit.parts != unit.part:
                    continue
                uid, label, data, err = _sample_fields(key, sample)
                if data is None or err:
                    # Unreadable metadata is a failure too: embedding it under its tar key and
                    # label -1 would give a row no later stage can join back to its sample.
                    errors.append((uid, err))
                    continue
                try:
                    tensors.append(decode_image(data, pre_pil, preprocess, image_size))
                except Exception as e:  # a bad image is a counted row, not a failed shard
                    errors.append((uid, f"{type(e).__name__}: {e}"[:200]))
                    continue
                uids.append(uid)
                labels.append(label)
                if len(tensors) == batch_size:
                    yield unit, uids, labels, torch.stack(tensors), errors, False
                    uids, labels, tensors, errors = [], [], [], []
        except (tarfile.TarError, OSError, EOFError) as e:
            if unit.part == 0:
                errors.append(("<shard>", f"unreadable tar: {type(e).__name__}: {e}"[:200]))
        yield unit, uids, labels, torch.stack(tensors) if tensors else None, errors, True


def _unit_dataset(units: list[_Unit], lm: LoadedModel, batch_size: int):
    """An IterableDataset over ``units`` whose workers split them (``units[id::workers]``)."""
    import torch

    args = (units, lm.pre_pil, lm.preprocess, lm.image_size, batch_size)

    class UnitBatches(torch.utils.data.IterableDataset):
        def __iter__(self):
            return _iter_unit_batches(*args)

    return UnitBatches()


def _loader(dataset, workers: int, pin: bool, batch_size=None, collate_fn=None):
    import torch

    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=pin,
        collate_fn=collate_fn,
        persistent_workers=False,
        prefetch_factor=2 if workers else None,
    )


def rank_world(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """This process's ``(rank, world_size)``: the arguments, else torchrun's ``RANK`` (or
    ``LOCAL_RANK``) and ``WORLD_SIZE``, else ``(0, 1)``. Raises InputError when out of range."""
    env = os.environ
    r = rank if rank is not None else int(env.get("RANK", env.get("LOCAL_RANK", 0)))
    w = world if world is not None else int(env.get("WORLD_SIZE", 1))
    if not 0 <= r < w:
        raise io.InputError(f"rank {r} is outside world size {w}")
    return r, w


def _finish(out: str, expected: list[str], meta: dict, stats_extra: dict) -> bool:
    """Write meta, stats and ``_SUCCESS`` once every expected shard is done; True if written."""
    done = set(E.completed_shards(out))
    if not set(expected) <= done:
        log.info(
            "%d of %d shards done; _SUCCESS waits for the other ranks",
            len(done & set(expected)),
            len(expected),
        )
        return False
    rows = 0
    failures: list = []
    for s in expected:
        d = io.read_json(io.join(out, f"{s}.done"))
        rows += d.get("rows", 0)
        failures.extend([s, *f] for f in d.get("errors", []))
    reasons = Counter(str(f[2]).split(":", 1)[0] for f in failures)
    io.write_json(io.join(out, E.META), meta)
    stats = {
        "shards": len(expected),
        "embedded": rows,
        "failed": len(failures),
        "failed_by_reason": dict(reasons.most_common()),
        "failures": failures[:MAX_FAILURES_IN_STATS],  # [shard, uid, reason]
        **stats_extra,
    }
    io.write_json(io.join(out, "stats.json"), stats)
    io.mark_done(out, {"rows": rows})
    return True


def _write_pool_shard(out: str, name: str, acc: dict, dim: int) -> None:
    """Rows sorted by uid: the same order whatever the worker count or tar order."""
    uids = np.asarray(acc["uids"], dtype=object)
    order = np.argsort(uids, kind="stable") if len(uids) else np.zeros(0, np.int64)
    feats = np.concatenate(acc["feats"]) if acc["feats"] else np.zeros((0, dim), np.float16)
    errors = sorted(acc["errors"], key=lambda e: (str(e[0]), str(e[1])))
    labels = np.asarray(acc["labels"], dtype=np.int32)
    E.write_shard(
        out, name, uids[order].tolist(), labels[order], feats[order], stats={"errors": errors}
    )


def embed_shards(
    cfg: EmbedConfig,
    shards_url: str,
    out: str,
    overwrite: bool = False,
    rank: int | None = None,
    world: int | None = None,
) -> dict:
    """Embed every webdataset tar under ``shards_url`` into ``out`` (one shard per tar).

    Args:
        cfg: stage config.
        shards_url: local directory or fsspec URL (``s3://...``) holding ``*.tar``.
        out: output directory URL.
        overwrite: redo a complete output (removes it first: with several ranks, only use it
            when no other rank is running).
        rank, world: this process's share (``tars[rank::world]``); default from the env.

    Returns:
        The stage's stats (``embedded``, ``failed``, ``failures``, timings), or, for a rank
        that finished before the others, this rank's own counts.

    Raises:
        pipeline.core.io.InputError: no tars at ``shards_url``; model problems (:func:`load_model`).
    """
    if not io.prepare_output(out, overwrite):
        return io.read_json(io.join(out, "stats.json"))
    from tqdm import tqdm

    rank, world = rank_world(rank, world)
    tars = io.list_files(shards_url, suffixes=(".tar",))
    if not tars:
        raise io.InputError(f"no .tar shards under {shards_url!r} (run the download stage first)")
    names = [t.rsplit("/", 1)[-1][: -len(".tar")] for t in tars]
    mine = list(zip(names, tars))[rank::world]
    done = set(E.completed_shards(out))
    todo = [(n, t) for n, t in mine if n not in done]
    log.info(
        "embed: %d shards (%d done, %d for rank %d/%d) -> %s",
        len(tars),
        len(done),
        len(todo),
        rank,
        world,
        out,
    )
    lm = load_model(cfg)
    meta = {**lm.meta, "kind": "image", "source": shards_url}
    dim = meta["embed_dim"]
    t0 = time.perf_counter()
    images = 0
    timing = {"wait_s": 0.0, "compute_s": 0.0, "write_s": 0.0}
    if todo:
        units = plan_units(todo, cfg.workers)
        parts_left = Counter(u.name for u in units)
        workers = min(cfg.workers, len(units))
        dataset = _unit_dataset(units, lm, cfg.batch_size)
        pending: dict[str, dict] = {}
        loader = _loader(dataset, workers, lm.device.startswith("cuda"))
        with tqdm(total=len(todo), desc="embed shards", unit="shard", disable=None) as bar:
            t_wait = time.perf_counter()
            for unit, uids, labels, batch, errors, last in loader:
                t_got = time.perf_counter()
                timing["wait_s"] += t_got - t_wait
                acc = pending.setdefault(
                    unit.name, {"uids": [], "labels": [], "feats": [], "errors": []}
                )
                acc["errors"].extend(tuple(e) for e in errors)
                if batch is not None:
                    acc["feats"].append(encode_images(lm, batch))
                    acc["uids"].extend(uids)
                    acc["labels"].extend(labels)
                    images += len(uids)
                t_enc = time.perf_counter()
                timing["compute_s"] += t_enc - t_got
                if last:
                    parts_left[unit.name] -= 1
                    if parts_left[unit.name] == 0:
                        _write_pool_shard(out, unit.name, pending.pop(unit.name), dim)
                        bar.update(1)
                t_wait = time.perf_counter()
                timing["write_s"] += t_wait - t_enc
    elapsed = time.perf_counter() - t0
    run = {
        "images_this_run": images,
        "seconds_this_run": round(elapsed, 3),
        "images_per_s_this_run": round(images / elapsed, 1) if elapsed > 0 and images else None,
        **{k: round(v, 3) for k, v in timing.items()},
        "rank": rank,
        "world_size": world,
    }
    if _finish(out, names, meta, run):
        return io.read_json(io.join(out, "stats.json"))
    return {"embedded": images, **run}


# ---------------------------------------------------------------------- task images


class _TaskImages:
    """Map-style dataset of task image files -> ``(index, tensor, error)``."""

    def __init__(self, items, lm: LoadedModel):
        self.items = items
        self.pre_pil, self.preprocess, self.size = lm.pre_pil, lm.preprocess, lm.image_size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        import torch

        try:
            with open(self.items[i].path, "rb") as f:
                return i, decode_image(f.read(), self.pre_pil, self.preprocess, self.size), ""
        except Exception as e:  # counted and recorded by the caller
            return i, torch.zeros(1), f"{type(e).__name__}: {e}"[:200]


def _collate(batch):
    import torch

    ok = [b for b in batch if not b[2]]
    bad = [(b[0], b[2]) for b in batch if b[2]]
    return [b[0] for b in ok], (torch.stack([b[1] for b in ok]) if ok else None), bad


def embed_task(
    cfg: EmbedConfig,
    dataset: str,
    split: str,
    root: str,
    out: str,
    layout: str | None = None,
    overwrite: bool = False,
    download: bool = False,
) -> dict:
    """Embed a target task's ``split`` images into shards of ``task_shard_size`` images.

    Args:
        cfg: stage config.
        dataset: bundled dataset name or YAML path (class order = label order).
        split: ``train`` or ``test``.
        root: local directory holding the dataset in ``layout`` (default: the dataset's).
        out: output directory URL.
        overwrite: redo a complete output.
        download: let torchvision download the dataset into ``root`` first (needs network).

    Returns:
        The stats (``embedded``, ``failed``, ``failures`` as ``[shard, relative path, reason]``).

    Raises:
        pipeline.core.io.InputError: missing or malformed layout; labels outside the dataset; a
            download that cannot reach the network; model problems.
    """
    if not io.prepare_output(out, overwrite):
        return io.read_json(io.join(out, "stats.json"))
    from tqdm import tqdm

    from pipeline.embed.tasks import list_task_images, torchvision_download

    spec = load_dataset(dataset)
    if download:
        torchvision_download(layout or spec.layout, root, split)
    items = list_task_images(spec, root, split, layout, seed=cfg.seed)
    lm = load_model(cfg)
    meta = {
        **lm.meta,
        "kind": "image",
        "source": root,
        "layout": layout or spec.layout,
        "split": split,
        "dataset": spec.name,
        "num_classes": spec.num_classes,
    }
    names = []
    t0 = time.perf_counter()
    for s, start in enumerate(range(0, len(items), cfg.task_shard_size)):
        name = f"{s:05d}"
        names.append(name)
        if E.shard_done(out, name):
            continue
        chunk = items[start : start + cfg.task_shard_size]
        loader = _loader(
            _TaskImages(chunk, lm),
            min(cfg.workers, max(1, len(chunk) // cfg.batch_size)),
            lm.device.startswith("cuda"),
            batch_size=cfg.batch_size,
            collate_fn=_collate,
        )
        uids, labels, paths, feats, errors = [], [], [], [], []
        desc = f"embed {split} {name}"
        for idx, batch, bad in tqdm(loader, desc=desc, unit="batch", disable=None):
            errors.extend((chunk[i].rel, err) for i, err in bad)
            if batch is None:
                continue
            feats.append(encode_images(lm, batch))
            uids.extend(chunk[i].uid(split) for i in idx)
            labels.extend(chunk[i].label for i in idx)
            paths.extend(chunk[i].rel for i in idx)
        f = np.concatenate(feats) if feats else np.zeros((0, meta["embed_dim"]), np.float16)
        E.write_shard(
            out,
            name,
            uids,
            labels,
            f,
            extra={"path": pa.array(paths, pa.string())},
            stats={"errors": errors},
        )
    _finish(
        out,
        names,
        meta,
        {"images": len(items), "seconds_this_run": round(time.perf_counter() - t0, 3)},
    )
    return io.read_json(io.join(out, "stats.json"))


# ---------------------------------------------------------------------- class prompts


def embed_text(cfg: EmbedConfig, dataset: str, out: str, overwrite: bool = False) -> dict:
    """Embed every prompt (templates x classes, then descriptions) into one shard ``text``.

    Rows carry ``label``, ``kind`` (``template``/``description``) and ``prompt``; ``meta.json``
    adds ``num_classes`` and ``classnames`` so heads can be rebuilt without the model
    (:func:`pipeline.core.embeddings.load_text`). Returns the stats (prompt counts).
    """
    if not io.prepare_output(out, overwrite):
        return io.read_json(io.join(out, "stats.json"))
    spec = load_dataset(dataset)
    labels, kinds, prompts = [], [], []
    for kind, source in (("template", spec.prompts), ("description", spec.class_descriptions)):
        for c in range(spec.num_classes):
            for p in source(c):
                labels.append(c)
                kinds.append(kind)
                prompts.append(p)
    lm = load_model(cfg)
    feats = encode_texts(lm, prompts, cfg.batch_size)
    uids = [io.make_uid(f"text:{k}:{lab}", p) for lab, k, p in zip(labels, kinds, prompts)]
    E.write_shard(out, "text", uids, labels, feats, extra={"kind": kinds, "prompt": prompts})
    meta = {
        **lm.meta,
        "kind": "text",
        "dataset": spec.name,
        "num_classes": spec.num_classes,
        "classnames": list(spec.classes),
    }
    io.write_json(io.join(out, E.META), meta)
    stats = {
        "prompts": len(prompts),
        "templates": kinds.count("template"),
        "descriptions": kinds.count("description"),
        "classes_without_description": sum(
            1 for c in range(spec.num_classes) if not spec.class_descriptions(c)
        ),
    }
    io.write_json(io.join(out, "stats.json"), stats)
    io.mark_done(out, stats)
    return stats


# ---------------------------------------------------------------------- CLI


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="open_clip model name (default from config: ViT-B-16)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--pretrained", help="open_clip tag, or 'none' for untrained seeded weights")
    w.add_argument("--checkpoint", help="state dict file or URL (torch.load weights_only=True)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--workers", type=int, help="DataLoader worker processes decoding images")
    p.add_argument("--seed", type=int, help="seed of untrained weights (--pretrained none)")
    p.add_argument("--out", required=True, help="output directory URL")
    p.add_argument("--overwrite", action="store_true", help="redo a complete output")


def cfg_from_args(args: argparse.Namespace) -> EmbedConfig:
    """The :class:`EmbedConfig` of a parsed ``embed*`` command line."""
    keys = ("model", "pretrained", "checkpoint", "device", "precision", "batch_size", "workers")
    flags = {k: getattr(args, k, None) for k in (*keys, "seed")}
    if flags.get("checkpoint"):
        flags["pretrained"] = ""
    return stage_config(EmbedConfig, "embed", args.config, args.overrides, flags)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "embed",
        parents=[common],
        help="stage 3: embed webdataset shards with open_clip",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--shards", required=True, help="directory URL of webdataset .tar shards")
    p.add_argument("--rank", type=int, help="this process's rank (default $RANK or 0)")
    p.add_argument("--world-size", dest="world_size", type=int, help="default $WORLD_SIZE or 1")
    _model_flags(p)
    p.set_defaults(
        func=lambda a: _report(
            embed_shards(cfg_from_args(a), a.shards, a.out, a.overwrite, a.rank, a.world_size),
            a.out,
        )
    )

    p = sub.add_parser(
        "embed-task", parents=[common], help="stage 3: embed a target task's train or test images"
    )
    p.add_argument("--dataset", required=True, help="bundled dataset name or path.yaml")
    p.add_argument("--split", required=True, choices=["train", "test"])
    p.add_argument("--root", required=True, help="directory holding the dataset's images")
    p.add_argument("--layout", help="override the dataset config's layout (imagefolder, ...)")
    p.add_argument(
        "--download",
        action="store_true",
        help="let torchvision download the dataset into --root first (needs network)",
    )
    _model_flags(p)
    p.set_defaults(
        func=lambda a: _report(
            embed_task(
                cfg_from_args(a),
                a.dataset,
                a.split,
                a.root,
                a.out,
                a.layout,
                a.overwrite,
                a.download,
            ),
            a.out,
        )
    )

    p = sub.add_parser(
        "embed-text",
        parents=[common],
        help="stage 3: embed every class prompt (templates and descriptions)",
    )
    p.add_argument("--dataset", required=True, help="bundled dataset name or path.yaml")
    _model_flags(p)
    p.set_defaults(
        func=lambda a: _report(embed_text(cfg_from_args(a), a.dataset, a.out, a.overwrite), a.out)
    )


def _report(stats: dict, out: str) -> int:
    brief = {k: v for k, v in stats.items() if k != "failures"}
    sys.stdout.write(f"{json.dumps(brief, default=str)} -> {out}\n")
    return 0
