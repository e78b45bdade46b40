"""What each registry stage runs: one function per stage, taking a
:class:`~pipeline.app.registry.Call` (its config section, inputs, output and parameters) and
calling the stage's library function. Imports are deferred so ``primer --help`` stays light.
"""

from __future__ import annotations

from pipeline.app.registry import Call


def _spark_master(call: Call) -> str | None:
    return call.section("spark").master or None


# ------------------------------------------------------------------------- run functions


def run_filter(call: Call) -> dict:
    from pipeline.text_filter.stage import run_text_filter

    return run_text_filter(
        call.cfg,
        call.params["dataset"],
        call.inputs["metadata"],
        call.out,
        master=_spark_master(call),
        overwrite=call.overwrite,
    )


def run_caption_filter(call: Call) -> dict:
    from dataclasses import replace

    from pipeline.caption_filter.stage import run_caption_filter as run

    cfg = call.cfg
    if call.params.get("threshold") is not None:  # applies to this dataset, calibrated or not
        cfg = replace(cfg, threshold=call.params["threshold"], thresholds={})
    embed = call.section("embed") if cfg.encoder == "open_clip" else None
    return run(
        cfg, call.params["dataset"], call.inputs["matches"], call.out, _spark_master(call),
        call.overwrite, embed,
    )  # fmt: skip


def run_download(call: Call) -> dict:
    from pipeline.download.stage import run_download as run

    return run(call.cfg, call.inputs["matches"], call.out, call.overwrite)


def run_embed_pool(call: Call) -> dict:
    from pipeline.embed.pool import embed_shards

    p = call.params
    return embed_shards(
        call.cfg, call.inputs["shards"], call.out, call.overwrite, p.get("rank"), p.get("world")
    )


def run_embed_task(call: Call) -> dict:
    from pipeline.embed.task import embed_task

    p = call.params
    return embed_task(
        call.cfg,
        p["dataset"],
        p["split"],
        p["data_root"],
        call.out,
        p.get("layout"),
        call.overwrite,
        bool(p.get("download")),
    )


def run_embed_text(call: Call) -> dict:
    from pipeline.embed.text import embed_text

    return embed_text(call.cfg, call.params["dataset"], call.out, call.overwrite)


def run_clip_filter(call: Call) -> dict:
    from pipeline.select.filters import run_clip_filter as run

    return run(call.cfg, call.inputs["pool"], call.inputs["text"], call.out, call.overwrite)


def run_transductive(call: Call) -> dict:
    from pipeline.select.filters import run_transductive as run

    i = call.inputs
    return run(call.cfg, i["pool"], i["queries"], call.out, i.get("text"), call.overwrite)


def run_materialise(call: Call) -> dict:
    from pipeline.materialise import run_materialise as run

    c = call.cfg
    return run(
        call.inputs["decision"],
        call.inputs["shards"],
        call.out,
        c.format,
        c.samples_per_shard,
        call.overwrite,
    )


def run_evaluate(call: Call) -> dict:
    from pipeline.evaluate.stage import run_evaluate as run

    i = call.inputs
    return run(
        call.cfg,
        call.params["dataset"],
        i["train"],
        i["test"],
        i["text"],
        call.out,
        i.get("priming"),
        call.overwrite,
        call.params.get("priming_dataset"),
    )


def run_report(call: Call) -> dict:
    from pipeline.report.page import write_report

    p = call.params
    return {"report": write_report(p["run_dir"], p.get("out"), p.get("per_class") or 12)}


def run_attribute(call: Call) -> dict:
    from pipeline.evaluate.attribution import run_call

    return run_call(call)


def run_import_embeddings(call: Call) -> dict:
    from pipeline.precomputed.importer import run_import

    i = call.inputs
    return run_import(
        call.cfg, i["source"], i["matches"], call.out, _spark_master(call), call.overwrite
    )


def run_knn_retrieve(call: Call) -> dict:
    from pipeline.precomputed.retrieve import run_knn_retrieve as run

    i, p = call.inputs, call.params
    return run(
        call.cfg, i["source"], i["queries"], call.out, i.get("folder"), p.get("dataset"),
        call.overwrite,
    )  # fmt: skip


def run_export_embeddings(call: Call) -> dict:
    from pipeline.precomputed.export import export_embeddings

    i = call.inputs
    return export_embeddings(call.cfg, i["src"], call.out, i.get("matches"), call.overwrite)


def run_candidates(call: Call) -> dict:
    from pipeline.precomputed.candidates import write_union

    return write_union(call.inputs, call.out, call.overwrite)


def run_kept_candidates(call: Call) -> dict:
    from pipeline.precomputed.candidates import write_kept

    i = call.inputs
    return write_kept(i["candidates"], i["decision"], call.out, call.overwrite)
