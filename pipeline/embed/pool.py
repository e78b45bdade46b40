"""``primer embed``: webdataset shards (the download stage's) -> one embedding shard per tar,
same name. A sample that does not decode is counted and skipped with its uid recorded; the
shard still completes. Completed shards (``S.done``) are skipped on rerun.

Several GPUs: one process per GPU, each taking ``shards[rank::world_size]`` (``RANK`` /
``WORLD_SIZE`` / ``LOCAL_RANK`` from torchrun, or ``--rank/--world-size``), on GPU
``LOCAL_RANK``. Every rank writes its own shards; whichever rank finds all shards done writes
``meta.json``, ``stats.json`` and ``_SUCCESS``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter

import numpy as np

from pipeline.core import embeddings as E
from pipeline.core import fingerprint, io
from pipeline.embed.config import EmbedConfig
from pipeline.embed.model import encode_images, load_model, model_identity
from pipeline.embed.shards import _loader, _unit_dataset, plan_units

log = logging.getLogger(__name__)


# The embedding format's version (pipeline.core.embeddings); another is never reused.
OUTPUT_FORMAT = 1

# Failure rows kept in stats.json (every one is in its shard's .done marker).
MAX_FAILURES_IN_STATS = 1000


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
    """Rows sorted by uid: the same order whatever the worker count or tar order. A family
    row's candidate classes ride along (``candidates``, null for the other rows)."""
    import pyarrow as pa

    uids = np.asarray(acc["uids"], dtype=object)
    order = np.argsort(uids, kind="stable") if len(uids) else np.zeros(0, np.int64)
    feats = np.concatenate(acc["feats"]) if acc["feats"] else np.zeros((0, dim), np.float16)
    errors = sorted(acc["errors"], key=lambda e: (str(e[0]), str(e[1])))
    labels = np.asarray(acc["labels"], dtype=np.int32)
    cands = pa.array([acc["cands"][i] for i in order.tolist()], pa.list_(pa.int32()))
    E.write_shard(
        out,
        name,
        uids[order].tolist(),
        labels[order],
        feats[order],
        extra={"candidates": cands},
        stats={"errors": errors},
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
    try:
        tars = io.list_files(shards_url, suffixes=(".tar",))
    except FileNotFoundError:
        tars = []
    if not tars:
        raise io.InputError(f"no .tar shards under {shards_url!r} (run the download stage first)")
    fp = fingerprint.make(
        "embed-pool",
        OUTPUT_FORMAT,
        inputs={"shards": fingerprint.input_identity(shards_url, (".tar",))},
        model=model_identity(cfg),
    )
    if not fingerprint.prepare(out, fp, overwrite):
        return io.read_json(io.join(out, "stats.json"))
    from pipeline.core.progress import progress

    rank, world = rank_world(rank, world)
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
        with progress(total=len(todo), desc="embed shards", unit="shard") as bar:
            t_wait = time.perf_counter()
            for unit, uids, labels, batch, errors, last, cands in loader:
                t_got = time.perf_counter()
                timing["wait_s"] += t_got - t_wait
                acc = pending.setdefault(
                    unit.name, {"uids": [], "labels": [], "cands": [], "feats": [], "errors": []}
                )
                acc["errors"].extend(tuple(e) for e in errors)
                if batch is not None:
                    acc["feats"].append(encode_images(lm, batch))
                    acc["uids"].extend(uids)
                    acc["labels"].extend(labels)
                    acc["cands"].extend(cands)
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
