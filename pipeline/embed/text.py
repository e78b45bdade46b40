"""``primer embed-text``: every template x class prompt, and the CuPL-style descriptions when the
dataset config names a file; one row per prompt, so heads can be rebuilt without the model."""

from __future__ import annotations

from pipeline.core import embeddings as E
from pipeline.core import fingerprint, io
from pipeline.core.config import load_dataset
from pipeline.embed.config import EmbedConfig
from pipeline.embed.model import encode_texts, load_model, model_identity
from pipeline.embed.pool import OUTPUT_FORMAT


def embed_text(cfg: EmbedConfig, dataset: str, out: str, overwrite: bool = False) -> dict:
    """Embed every prompt (templates x classes, then descriptions) into one shard ``text``.

    Rows carry ``label``, ``kind`` (``template``/``description``) and ``prompt``; ``meta.json``
    adds ``num_classes`` and ``classnames`` so heads can be rebuilt without the model
    (:func:`pipeline.core.embeddings.load_text`). Returns the stats (prompt counts).
    """
    spec = load_dataset(dataset)
    fp = fingerprint.make(
        "embed-text",
        OUTPUT_FORMAT,
        dataset=spec.identity("classes", "templates", "descriptions"),
        model=model_identity(cfg),
    )
    if not fingerprint.prepare(out, fp, overwrite):
        return io.read_json(io.join(out, "stats.json"))
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
