"""Reading pool images: webdataset tars streamed member by member (names are untrusted and
nothing is extracted), images decoded to the model's uint8 crops in DataLoader workers. When
there are fewer tars than workers, each tar is split into interleaved parts, each read by its
own worker, so every worker decodes.
"""

from __future__ import annotations

import io as _io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core import io

if TYPE_CHECKING:
    from pipeline.embed.model import LoadedModel

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


MAX_MEMBER_BYTES = 64 * 2**20


# Declared width x height above which an image is refused before it is decoded (the download
# stage's default max_image_pixels, and Pillow's warning threshold): a 100 kB PNG can declare
# 10^8 pixels and cost a worker gigabytes once decoded and converted to RGB.
MAX_IMAGE_PIXELS = 89_478_485


class ImageTooLarge(ValueError):
    """An image whose header declares more than :data:`MAX_IMAGE_PIXELS` pixels."""


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


def _sample_fields(
    key: str, sample: dict[str, bytes]
) -> tuple[str, int, list[int] | None, bytes | None, str]:
    """``(uid, label, candidates, image bytes or None, error)`` of one webdataset sample;
    ``error`` is empty when the sample can be embedded (a sample without json keeps its key as
    uid). ``candidates``: the classes a family row may be (the text filter's), else None."""
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
    cands = meta.get("candidates")
    if cands is not None and not (
        isinstance(cands, list) and all(type(c) is int for c in cands) and label in cands
    ):
        cands, err = None, err or f"candidates {cands!r} are not a list of classes with the label"
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return uid, label, cands, None, f"no image in sample: members {sorted(sample)}"
    return uid, label, cands, sample[ext], err


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
    """Yield ``(unit, uids, labels, tensor|None, errors, last, candidates)``: batches of
    decoded images, then one ``last`` message per unit. A bad sample is an error row, not a
    failed shard; a tar that cannot be read is one ``<shard>`` error row and the rows read
    before it. ``candidates`` holds each image's candidate classes (None for most)."""
    import torch

    info = torch.utils.data.get_worker_info()
    mine = units if info is None else units[info.id :: info.num_workers]
    for unit in mine:
        uids: list[str] = []
        labels: list[int] = []
        cands: list = []
        tensors: list = []
        errors: list = []
        try:
            for i, (key, sample) in enumerate(iter_tar_samples(unit.url)):
                if i % unit.parts != unit.part:
                    continue
                uid, label, cand, data, err = _sample_fields(key, sample)
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
                cands.append(cand)
                if len(tensors) == batch_size:
                    yield unit, uids, labels, torch.stack(tensors), errors, False, cands
                    uids, labels, cands, tensors, errors = [], [], [], [], []
        except (tarfile.TarError, OSError, EOFError) as e:
            if unit.part == 0:
                errors.append(("<shard>", f"unreadable tar: {type(e).__name__}: {e}"[:200]))
        batch = torch.stack(tensors) if tensors else None
        yield unit, uids, labels, batch, errors, True, cands


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
