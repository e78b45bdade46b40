"""``primer embed-task``: a target task's train or test images (:mod:`pipeline.embed.tasks`
reads its on-disk layout) into shards of ``task_shard_size`` images."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipeline.core import embeddings as E
from pipeline.core import fingerprint, io
from pipeline.core.config import load_dataset
from pipeline.embed.config import EmbedConfig
from pipeline.embed.model import LoadedModel, encode_images, load_model, model_identity
from pipeline.embed.pool import OUTPUT_FORMAT, _finish
from pipeline.embed.shards import _loader, decode_image


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
    from pipeline.core.progress import progress
    from pipeline.embed.tasks import images_identity, list_task_images, torchvision_download

    spec = load_dataset(dataset)
    if download:
        torchvision_download(layout or spec.layout, root, split)
    items = list_task_images(spec, root, split, layout, seed=cfg.seed)
    fp = fingerprint.make(
        "embed-task",
        OUTPUT_FORMAT,
        {"split": split, "layout": layout or spec.layout},
        {"images": images_identity(items)},
        dataset=spec.identity("classes"),
        model=model_identity(cfg),
    )
    if not fingerprint.prepare(out, fp, overwrite):
        return io.read_json(io.join(out, "stats.json"))
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
        for idx, batch, bad in progress(loader, desc=desc, unit="batch"):
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
