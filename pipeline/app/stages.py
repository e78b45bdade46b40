"""The stage registry: every stage declared once, with the function that runs it on a
:class:`~pipeline.app.registry.Call`. The ``primer`` command line builds a subcommand per
entry; ``primer subset`` (:mod:`pipeline.app.subset`) places the same entries in a run
directory and calls the same functions.
"""

from __future__ import annotations

from pipeline.app.registry import Call, Option, Stage
from pipeline.core import io

# Options shared by several stages.
DATASET = Option(
    ("--dataset",),
    "param:dataset",
    "bundled dataset name (primer classes --list) or the path of a dataset YAML",
    {"required": True},
)


def _out(what: str = "output directory (any fsspec URL)") -> Option:
    return Option(("--out",), "out", what, {"required": True})


# The embedding folder's options (import-embeddings, knn-retrieve).
FOLDER_OPTIONS = (
    Option(("--emb-glob",), "precomputed.emb_glob", "embedding files under the folder's root"),
    Option(("--meta-glob",), "precomputed.meta_glob", "metadata files under the folder's root"),
    Option(("--model",), "precomputed.model", "open_clip model that made the embeddings"),
    Option(("--pretrained",), "precomputed.pretrained", "its pretrained tag (e.g. openai)"),
)

MODEL_OPTIONS = (
    Option(("--model",), "embed.model", "open_clip model name, hf-hub:org/repo or local-dir:PATH"),
    Option(("--pretrained",), "embed.pretrained", "open_clip pretrained tag, or none (untrained)"),
    Option(
        ("--checkpoint",), "embed.checkpoint", "state dict file or URL (wins over --pretrained)"
    ),
    Option(("--device",), "embed.device", "auto | cpu | cuda | cuda:N"),
    Option(("--precision",), "embed.precision", "auto | fp32 | amp | amp_bf16 (open_clip's names)"),
    Option(("--batch-size",), "embed.batch_size", "images per forward pass", {"type": int}),
    Option(("--workers",), "embed.workers", "DataLoader processes decoding images", {"type": int}),
    Option(("--seed",), "embed.seed", "seed of untrained weights", {"type": int}),
)


def _embedded(stats: dict, call: Call) -> str:
    import json

    brief = {k: v for k, v in stats.items() if k != "failures"}
    return f"{json.dumps(brief, default=str)} -> {call.out}"


def _evaluated(stats: dict, call: Call) -> str:
    # The table is this command's result, so it goes to stdout (logs go to stderr).
    return io.read_bytes(io.join(call.out, "results.md")).decode("utf-8").rstrip("\n")


# ------------------------------------------------------------------------- the registry

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "filter",
            "stage 1: keep LAION rows whose captions name a class (Spark)",
            "pipeline.app.adapters:run_filter",
            "filter",
            (
                DATASET,
                Option(
                    ("--metadata",),
                    "input:metadata",
                    "LAION parquet: a file, directory, glob or URL (s3://, hf://, ...)",
                    {"required": True},
                ),
                _out(),
                Option(("--master",), "spark.master", "Spark master when no session is active"),
            ),
            lambda s, c: f"{s['rows_matched']} matches of {s['rows_scanned']} rows -> {c.out}",
        ),
        Stage(
            "caption-filter",
            "stage 1b: keep matches whose caption means the class (sentence encoder, Spark)",
            "pipeline.app.adapters:run_caption_filter",
            "caption_filter",
            (
                DATASET,
                Option(
                    ("--matches",), "input:matches", "the text filter's output", {"required": True}
                ),
                _out(),
                Option(
                    ("--threshold",),
                    "param:threshold",
                    "the score a row needs, for this dataset (default: its calibrated one)",
                    {"type": float},
                ),
                Option(("--device",), "caption_filter.device", "auto | cpu | cuda | cuda:N"),
                Option(("--master",), "spark.master", "Spark master when no session is active"),
            ),
            lambda s, c: f"{s['rows_kept']} of {s['rows_in']} matches kept -> {c.out}",
        ),
        Stage(
            "download",
            "stage 2: download matched rows into webdataset shards (img2dataset)",
            "pipeline.app.adapters:run_download",
            "download",
            (
                Option(
                    ("--matches",), "input:matches", "the text filter's output", {"required": True}
                ),
                _out("output directory for the shards (local or s3://)"),
                Option(
                    ("--processes",),
                    "download.processes",
                    "downloader processes (0: one per core)",
                    {"type": int},
                ),
                Option(("--threads",), "download.threads", "threads per process", {"type": int}),
            ),
            lambda s, c: f"{s['success']}/{s['total']} images downloaded -> {c.out}",
        ),
        Stage(
            "import-embeddings",
            "stage 1c: import the matched rows' precomputed embeddings (clip-retrieval folder)",
            "pipeline.app.adapters:run_import_embeddings",
            "precomputed",
            (
                Option(
                    ("--source",),
                    "input:source",
                    "root of the embedding folder (img_emb/ + metadata/; any fsspec URL)",
                    {"required": True},
                ),
                Option(
                    ("--matches",),
                    "input:matches",
                    "matches directory (filter, caption-filter or knn-retrieve output)",
                    {"required": True},
                ),
                _out(),
                *FOLDER_OPTIONS,
                Option(
                    ("--engine",),
                    "precomputed.engine",
                    "local (threads), spark (a task per file) or auto",
                    {"choices": ["auto", "local", "spark"]},
                ),
                Option(("--master",), "spark.master", "Spark master when no session is active"),
            ),
            lambda s, c: (
                f"{s['imported']} of {s['matches']} matches imported "
                f"({s['missing']} missing) -> {c.out}"
            ),
        ),
        Stage(
            "knn-retrieve",
            "stage 1c: the k nearest rows of an embedding folder per class prompt or task image",
            "pipeline.app.adapters:run_knn_retrieve",
            "precomputed",
            (
                Option(
                    ("--source",),
                    "input:source",
                    "embedding folder root, or a FAISS index file",
                    {"required": True},
                ),
                Option(
                    ("--queries",),
                    "input:queries",
                    "embed-text output (a query per class), or task embeddings (per image)",
                    {"required": True},
                ),
                _out(),
                Option(("--k",), "precomputed.k", "neighbours per query", {"type": int}),
                Option(
                    ("--folder",),
                    "input:folder",
                    "the folder a foreign index (no .json sidecar) indexes",
                ),
                Option(
                    ("--dataset",),
                    "param:dataset",
                    "names the classes of image queries (bundled name or YAML)",
                ),
                *FOLDER_OPTIONS,
            ),
            lambda s, c: (
                f"{s['candidates']} {s['source']} candidates for {s['queries']} queries -> {c.out}"
            ),
        ),
        Stage(
            "export-embeddings",
            "stage 3b: write embeddings in the clip-retrieval layout (img_emb/ + metadata/)",
            "pipeline.app.adapters:run_export_embeddings",
            "precomputed",
            (
                Option(
                    ("--src",),
                    "input:src",
                    "an embedding directory (embed-pool, import-embeddings)",
                    {"required": True},
                ),
                _out("output folder URL"),
                Option(
                    ("--matches",),
                    "input:matches",
                    "matches that give url and caption by uid, where the embeddings lack them",
                ),
                Option(
                    ("--dtype",),
                    "precomputed.export_dtype",
                    "float16 or float32",
                    {"choices": ["float16", "float32"]},
                ),
            ),
            lambda s, c: f"{s['rows']} rows in {s['files']} files -> {c.out}",
        ),
        Stage(
            "candidates",
            "stage 1c: the union of candidate sources, one row per URL (source kept)",
            "pipeline.app.adapters:run_candidates",
            None,
            tuple(
                Option((f"--{name}",), f"input:{name}", f"{name} candidates (a matches directory)")
                for name in ("text", "knn-text", "knn-image")
            )
            + (_out(),),
            lambda s, c: f"{s['urls']} candidate URLs -> {c.out}",
        ),
        Stage(
            "kept-candidates",
            "stage 4b: the candidates a decision kept (what is left to download)",
            "pipeline.app.adapters:run_kept_candidates",
            None,
            (
                Option(("--candidates",), "input:candidates", "the candidates", {"required": True}),
                Option(
                    ("--decision",),
                    "input:decision",
                    "a decision over their imported embeddings",
                    {"required": True},
                ),
                _out(),
            ),
            lambda s, c: (
                f"{s['kept']} of {s['candidates']} kept ({s['downloads_avoided']} "
                f"downloads avoided) -> {c.out}"
            ),
        ),
        Stage(
            "embed-pool",
            "stage 3: embed the downloaded webdataset shards with open_clip",
            "pipeline.app.adapters:run_embed_pool",
            "embed",
            (
                Option(
                    ("--shards",),
                    "input:shards",
                    "directory URL of webdataset .tar shards",
                    {"required": True},
                ),
                _out(),
                *MODEL_OPTIONS,
                Option(
                    ("--rank",),
                    "param:rank",
                    "this process's rank (default $RANK or 0)",
                    {"type": int},
                ),
                Option(
                    ("--world-size",),
                    "param:world",
                    "processes in all (default $WORLD_SIZE or 1)",
                    {"type": int},
                ),
            ),
            _embedded,
            aliases=("embed",),
        ),
        Stage(
            "embed-task",
            "stage 3: embed a target task's train or test images",
            "pipeline.app.adapters:run_embed_task",
            "embed",
            (
                DATASET,
                Option(
                    ("--split",),
                    "param:split",
                    "which split",
                    {"required": True, "choices": ["train", "test"]},
                ),
                Option(
                    ("--data-root", "--root"),
                    "param:data_root",
                    "directory holding the dataset's images",
                    {"required": True},
                ),
                _out(),
                Option(("--layout",), "param:layout", "override the dataset config's layout"),
                Option(
                    ("--download",),
                    "param:download",
                    "let torchvision download the dataset into --data-root first (needs network)",
                    {"action": "store_true"},
                ),
                *MODEL_OPTIONS,
            ),
            _embedded,
        ),
        Stage(
            "embed-text",
            "stage 3: embed every class prompt (templates and descriptions)",
            "pipeline.app.adapters:run_embed_text",
            "embed",
            (DATASET, _out(), *MODEL_OPTIONS),
            _embedded,
        ),
        Stage(
            "clip-filter",
            "stage 4: CLIP-score filter (writes a decision only)",
            "pipeline.app.adapters:run_clip_filter",
            "select",
            (
                Option(
                    ("--pool",),
                    "input:pool",
                    "pool embeddings (or a decision to start from)",
                    {"required": True},
                ),
                Option(
                    ("--text",),
                    "input:text",
                    "class prompt embeddings (primer embed-text)",
                    {"required": True},
                ),
                _out("decision directory URL"),
                Option(
                    ("--min-prob",),
                    "select.min_prob",
                    "minimum softmax probability of the caption label",
                    {"type": float},
                ),
                Option(
                    ("--require-agreement",),
                    "select.require_agreement",
                    "keep only images whose zero-shot prediction is their caption label",
                    {"action": "store_true"},
                ),
                Option(
                    ("--no-require-agreement",),
                    "select.require_agreement",
                    "keep images whatever their zero-shot prediction",
                    {"action": "store_false"},
                ),
            ),
            lambda s, c: f"kept {s['kept']} of {s['pool']} -> {c.out}",
            description="Keep a pool image when softmax(100 f.T)[caption label] >= min_prob and, "
            "with require_agreement, when its zero-shot prediction is its caption label. Writes a "
            "decision directory (decision.parquet, meta.json, stats.json, _SUCCESS).",
        ),
        Stage(
            "transductive",
            "stage 4: transductive kNN filter (writes a decision only)",
            "pipeline.app.adapters:run_transductive",
            "select",
            (
                Option(
                    ("--pool",),
                    "input:pool",
                    "pool embeddings, or a decision (e.g. the CLIP filter's) to start from",
                    {"required": True},
                ),
                Option(
                    ("--queries",),
                    "input:queries",
                    "target-task embeddings (usually the test split)",
                    {"required": True},
                ),
                Option(
                    ("--text",),
                    "input:text",
                    "class prompt embeddings (needed by mode per_class; names classes in stats)",
                ),
                _out("decision directory URL"),
                Option(("--k",), "select.k", "neighbours per query", {"type": int}),
                Option(
                    ("--mode",),
                    "select.mode",
                    "global | kshot (the query's true label) | per_class (its predicted class)",
                    {"choices": ["global", "kshot", "per_class"]},
                ),
                Option(
                    ("--kshot",),
                    "select.mode",
                    "same as --mode kshot",
                    {"action": "store_const", "const": "kshot"},
                ),
                Option(
                    ("--per-class",),
                    "select.mode",
                    "same as --mode per_class",
                    {"action": "store_const", "const": "per_class"},
                ),
            ),
            lambda s, c: f"kept {s['kept']} of {s['pool']} -> {c.out}",
            description="Keep the union of every query image's k nearest pool images (cosine, "
            "FAISS: exact up to select.exact_max_pool pool vectors, IVF above).",
        ),
        Stage(
            "materialise",
            "stage 5: write the kept images as webdataset shards or an ImageFolder",
            "pipeline.app.adapters:run_materialise",
            "materialise",
            (
                Option(
                    ("--decision",),
                    "input:decision",
                    "a decision directory, or pool embeddings to keep everything",
                    {"required": True},
                ),
                Option(
                    ("--shards",),
                    "input:shards",
                    "the download stage's webdataset shards",
                    {"required": True},
                ),
                _out(),
                Option(
                    ("--format",),
                    "materialise.format",
                    "webdataset or imagefolder",
                    {"choices": ["webdataset", "imagefolder"]},
                ),
            ),
            lambda s, c: f"{s['written']} images -> {c.out}",
        ),
        Stage(
            "evaluate",
            "stage 6: accuracy table of zero-shot, CuPL, priming and few-shot heads",
            "pipeline.app.adapters:run_evaluate",
            "evaluate",
            (
                DATASET,
                Option(
                    ("--task-train",),
                    "input:train",
                    "train-split embeddings (shots come from here)",
                    {"required": True},
                ),
                Option(
                    ("--task-test",),
                    "input:test",
                    "test-split embeddings",
                    {"required": True},
                ),
                Option(
                    ("--text",),
                    "input:text",
                    "class prompt embeddings (embed-text)",
                    {"required": True},
                ),
                Option(
                    ("--priming",),
                    "input:priming",
                    "priming embeddings or a decision; repeat for several (zero-shot priming "
                    "from the CLIP filter's decision, transductive priming from the "
                    "transductive one)",
                    {"action": "append"},
                ),
                Option(
                    ("--priming-dataset",),
                    "param:priming_dataset",
                    "the dataset the priming pools' labels belong to (default --dataset)",
                ),
                _out(),
                Option(("--shots",), "evaluate.shots", "comma list of shots per class"),
                Option(("--seeds",), "evaluate.seeds", "shot draws per shot count", {"type": int}),
                Option(
                    ("--alpha",), "evaluate.alpha", "weight of the text head in [0, 1], or auto"
                ),
                Option(
                    ("--head",),
                    "evaluate.head",
                    "centroid or tip-adapter",
                    {"choices": ["centroid", "tip-adapter"]},
                ),
                Option(
                    ("--protocol",),
                    "evaluate.protocol",
                    "primer, or reference: what the public Neural Priming code computes",
                    {"choices": ["primer", "reference"]},
                ),
            ),
            _evaluated,
        ),
        Stage(
            "attribute",
            "rank priming images, caption terms and classes by their effect on accuracy",
            "pipeline.app.adapters:run_attribute",
            "attribute",
            (
                Option(
                    ("run_dir",),
                    "param:run_dir",
                    "a primer subset run directory (gives every input)",
                    {"nargs": "?"},
                ),
                Option(("--dataset",), "param:dataset", "bundled dataset name or a dataset YAML"),
                Option(("--task-train",), "input:train", "train-split embeddings (labelled)"),
                Option(("--text",), "input:text", "class prompt embeddings (embed-text)"),
                Option(("--priming",), "input:priming", "priming embeddings or a decision"),
                Option(("--matches",), "input:matches", "the text filter's matches (terms)"),
                Option(("--task-test",), "input:test", "test embeddings (--drop-harmful only)"),
                Option(("--out",), "out", "output directory (default RUN_DIR/attribution)"),
                Option(
                    ("--labelled",),
                    "attribute.labelled",
                    "the labelled set: the train split or shots drawn from it",
                    {"choices": ["train", "shots"]},
                ),
                Option(("--alpha",), "attribute.alpha", "text head weight in [0, 1], or auto"),
                Option(
                    ("--drop-harmful",),
                    "attribute.drop_harmful",
                    "drop the harmful images and re-evaluate (rows of their own)",
                    {"action": "store_true"},
                ),
                Option(
                    ("--max-drop",),
                    "attribute.max_drop",
                    "at most this many dropped (0: all)",
                    {"type": int},
                ),
            ),
            lambda s, c: s["line"],
            description="For the training-free centroid head, the exact change in accuracy on "
            "a labelled set (the train split or shots; never test labels) when each priming "
            "image, caption term or class is removed (Jain et al., A Data-Based Perspective on "
            "Transfer Learning). Writes images/terms/classes.parquet and ranking.json under "
            "--out; --drop-harmful also evaluates the priming set without the harmful images.",
        ),
        Stage(
            "report",
            "write a static HTML report of a run directory",
            "pipeline.app.adapters:run_report",
            None,
            (
                Option(
                    ("run_dir",),
                    "param:run_dir",
                    "a run directory written by primer subset (any fsspec URL)",
                ),
                Option(
                    ("--out",),
                    "param:out",
                    "where to write the HTML (default <run_dir>/report/index.html)",
                ),
                Option(
                    ("--per-class",), "param:per_class", "images shown per class", {"type": int}
                ),
            ),
            lambda s, c: s["report"],
            description="Per class: retrieved images with captions, match terms, scores and "
            "kept/dropped reasons; counts through the stages; the accuracy table.",
        ),
    )
}
