"""`primer subset --embeddings`: selection on precomputed embeddings before any download, on
the demo corpus, whose pool is exported as a LAION / clip-retrieval embedding folder."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from pipeline.app.cli import main
from pipeline.core import embeddings as E
from pipeline.core import io
from pipeline.demo.run import run_demo
from tests.conftest import DEMO_ROWS

# The folder's model: the demo's architecture untrained (a folder names its model by open_clip
# name and tag, which the shipped checkpoint has not); the runs below use it too.
SETTINGS = ["precomputed.model=primer-demo-vit", "precomputed.pretrained=none"]
UNTRAINED = "none"


@pytest.fixture
def folder(demo_run, tmp_path):
    """The demo's pool, embedded by the folder's model, in the clip-retrieval layout (url,
    caption from matches)."""
    from pipeline.embed.config import EmbedConfig
    from pipeline.embed.pool import embed_shards

    pool = str(tmp_path / "pool")
    cfg = EmbedConfig(model="primer-demo-vit", pretrained="none", device="cpu", workers=0)
    embed_shards(cfg, os.path.join(demo_run, "shards"), pool)
    out = str(tmp_path / "laion-emb")
    argv = ["export-embeddings", "--src", pool, "--out", out]
    assert main([*argv, "--matches", os.path.join(demo_run, "matches")]) == 0
    assert os.listdir(os.path.join(out, "img_emb")) and os.listdir(os.path.join(out, "metadata"))
    return out


def _status(run):
    from pipeline.app.subset import STAGE_OUT

    return {name: io.is_done(os.path.join(run, out)) for name, out in STAGE_OUT.items() if out}


def test_select_before_download_without_any_download(folder, tmp_path, port, capsys):
    run = str(tmp_path / "run")
    extra = [
        f"subset.embeddings={folder}",
        "subset.metadata=",  # the folder's own metadata: matches know their rows
        "subset.candidates=[text, knn-text, knn-image]",
        "precomputed.k=20",
        *SETTINGS,
    ]
    assert (
        run_demo(run, port=port, rows=DEMO_ROWS, extra_overrides=extra, pretrained=UNTRAINED) == 0
    )
    done = _status(run)
    assert not os.path.exists(os.path.join(run, "shards"))  # the model serves: no download
    for step in ("filter", "knn-text", "knn-image", "candidates", "import-embeddings",
                 "clip-filter", "transductive", "kept", "evaluate"):  # fmt: skip
        assert done[step], step
    matches = pq.read_table(os.path.join(run, "matches")).to_pylist()
    assert matches and all(r["source_file"].startswith(folder) for r in matches)
    imported = io.read_json(os.path.join(run, "emb", "imported", "stats.json"))
    cand = io.read_json(os.path.join(run, "candidates", "all", "_stats.json"))
    assert imported["imported"] == cand["urls"] and imported["missing"] == 0
    assert set(cand["rows_in"]) == {"text", "knn-text", "knn-image"}
    kept = io.read_json(os.path.join(run, "candidates", "kept", "_stats.json"))
    assert kept["candidates"] > kept["kept"] > 0
    assert kept["downloads_avoided"] == kept["candidates"] - kept["kept"]
    n = kept["candidates"]  # nothing was downloaded at all
    out = capsys.readouterr().out
    assert f"Downloads avoided: {n} of {n} candidates" in out
    assert "untrained model (pretrained=none)" in out  # primer demo --pretrained none
    # Evaluation ran on the imported vectors: the priming rows are the kept ones.
    res = io.read_json(os.path.join(run, "eval", "results.json"))
    assert res["priming"]["transductive priming"]["priming_images"] == kept["kept"]
    uids, _, _ = E.load(os.path.join(run, "decisions", "transductive"))
    assert len(uids) == kept["kept"]


def test_force_download_fetches_only_the_kept_rows(folder, tmp_path, port, capsys):
    run = str(tmp_path / "run")
    extra = [
        f"subset.embeddings={folder}",
        "subset.metadata=",
        "subset.force_download=true",
        *SETTINGS,
    ]
    assert (
        run_demo(run, port=port, rows=DEMO_ROWS, extra_overrides=extra, pretrained=UNTRAINED) == 0
    )
    kept = io.read_json(os.path.join(run, "candidates", "kept", "_stats.json"))
    shards = io.read_json(os.path.join(run, "shards", "stats.json"))
    assert shards["total"] == kept["kept"] < kept["candidates"]
    avoided = kept["candidates"] - kept["kept"]
    assert f"Downloads avoided: {avoided} of {kept['candidates']}" in capsys.readouterr().out
    assert io.is_done(os.path.join(run, "emb", "pool")) and io.is_done(os.path.join(run, "eval"))


def test_select_first_needs_the_folders_model(folder, tmp_path, caplog):
    argv = ["subset", "--dataset", "FashionMNIST", "--embeddings", folder,
            "--run-dir", str(tmp_path / "r"), "--data-root", str(tmp_path)]  # fmt: skip
    assert main(argv) == 1 and "precomputed.model" in caplog.text
    caplog.clear()
    no_folder = ["subset", "--dataset", "FashionMNIST", "--run-dir", str(tmp_path / "r")]
    assert main([*no_folder, "--candidates", "knn-text"]) == 2
    assert "kNN candidates need precomputed embeddings" in caplog.text
