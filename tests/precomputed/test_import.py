"""Issue 21: import-embeddings (the matched rows' vectors gathered by row, through a real local
Spark session and from loopback S3), the model check where embeddings are combined, candidate
unions, and selection before download."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from pipeline.app.cli import main
from pipeline.core import embeddings as E
from pipeline.core import io
from pipeline.demo.embedding_folder import make_folder, npy_bytes, unit
from pipeline.precomputed.config import PrecomputedConfig
from pipeline.precomputed.importer import MISSING, run_import
from tests.embedding_dirs import write_text_embeddings

CLASSES = ["tabby cat", "golden retriever", "rose"]
CFG = PrecomputedConfig(model="ViT-L-14", pretrained="openai", engine="local")


def _by_uid(made: dict) -> dict[str, np.ndarray]:
    """Every folder row's unit vector by its uid (the brute-force reference)."""
    vecs = unit(made["vectors"])
    return {
        io.make_uid(u, c): vecs[i] for i, (u, c) in enumerate(zip(made["urls"], made["captions"]))
    }


def _matches(out: str, table: pa.Table) -> str:
    io.write_parquet(table, io.join(out, "part-00000.parquet"))
    io.mark_done(out)
    return out


@pytest.mark.spark
@pytest.mark.usefixtures("spark")
def test_text_filter_then_import_through_spark(tmp_path):
    """The text filter runs on the folder's own metadata; its matches' vectors are gathered by
    row in one Spark task per file: each equals the folder's row, L2-normalised."""
    root = str(tmp_path / "laion")
    made = make_folder(root, sizes=(300, 500, 200, 250), classnames=CLASSES, row_group_size=128)
    ds_yaml = tmp_path / "pets.yaml"
    ds_yaml.write_text(f"name: Pets\nclasses: {CLASSES}\n")
    matches = str(tmp_path / "matches")
    assert (
        main(
            [
                "filter",
                "--dataset",
                str(ds_yaml),
                "--metadata",
                f"{root}/metadata",
                "--out",
                matches,
            ]
        )
        == 0
    )
    n_matches = io.read_parquet(matches).num_rows
    out = str(tmp_path / "pool")
    argv = ["import-embeddings", "--source", root, "--matches", matches, "--out", out]
    argv += [
        "--model",
        "ViT-L-14",
        "--pretrained",
        "openai",
        "--engine",
        "spark",
        "--master",
        "local[2]",
    ]
    assert main(argv) == 0
    uids, labels, feats = E.load(out)
    assert len(uids) == n_matches > 100
    ref = _by_uid(made)
    np.testing.assert_allclose(
        feats.astype(np.float32), np.stack([ref[u] for u in uids]), atol=1e-3
    )
    table, _ = E.load_table(out)
    m = io.read_parquet(matches)
    want = dict(zip(m.column("uid").to_pylist(), m.column("label").to_pylist()))
    assert dict(zip(uids.tolist(), labels.tolist())) == want
    assert {"url", "caption", "class_name", "source_file", "source_row"} <= set(table.column_names)
    meta = E.read_meta(out)
    assert (
        meta["model"] == "ViT-L-14" and meta["pretrained"] == "openai" and meta["embed_dim"] == 16
    )
    stats = io.read_json(io.join(out, "stats.json"))
    assert stats["resolved_by"] == {"source_row": n_matches} and stats["missing"] == 0
    assert stats["files_read"] == 4 and len(E.completed_shards(out)) == 4
    assert io.read_parquet(io.join(out, MISSING)).num_rows == 0


def test_import_from_s3_reads_only_the_rows(s3_bucket, tmp_path):
    root = io.join(s3_bucket, "laion")
    made = make_folder(root, sizes=(400, 600), dim=32, dtypes=("float16", "float32"))
    pick = np.array([3, 5, 6, 399, 420, 700, 999])
    t = pa.table(
        {
            "uid": [io.make_uid(made["urls"][i], made["captions"][i]) for i in pick],
            "url": [made["urls"][i] for i in pick],
            "caption": [made["captions"][i] for i in pick],
            "label": pa.array(np.arange(len(pick)) % 3, pa.int32()),
            "source_file": [made["meta"][int(i >= 400)] for i in pick],
            "source_row": pa.array(np.where(pick >= 400, pick - 400, pick), pa.int64()),
        }
    )
    matches = _matches(io.join(s3_bucket, "matches"), t)
    out = io.join(s3_bucket, "pool")
    stats = run_import(PrecomputedConfig(model="ViT-L-14", gap_bytes=128), root, matches, out)
    assert (
        stats["imported"] == len(pick) and stats["bytes_read"] < stats["bytes_in_files_read"] / 20
    )
    assert stats["requests"] == 5  # rows 3, 5-6, 399 | 20, 300, 599
    uids, _, feats = E.load(out)
    ref = _by_uid(made)
    np.testing.assert_allclose(
        feats.astype(np.float32), np.stack([ref[u] for u in uids]), atol=1e-3
    )


def test_url_join_fallback_and_every_loss_has_its_reason(tmp_path):
    root = str(tmp_path / "laion")
    made = make_folder(root, sizes=(40, 60))
    # Row 7 of file 1 holds NaN: its match is kept out as a bad vector.
    x = np.load(made["emb"][1])
    x[7] = np.nan
    io.write_bytes(made["emb"][1], npy_bytes(x))
    u, c = made["urls"], made["captions"]
    rows = [
        # (url, caption, source_file, source_row): how it resolves
        (u[5], c[5], made["meta"][0], 5),  # by its source row
        (u[12], c[12], None, None),  # no source: joined on url + caption
        (u[50], "a caption the folder lacks", None, None),  # joined on url alone
        ("http://gone.test/x.jpg", "x", None, None),  # in no file
        (u[3], c[3], made["meta"][0], 9),  # the row's url is another: url_mismatch
        (u[47], c[47], made["meta"][1], 7),  # NaN vector
        (u[20], c[20], "/copy/elsewhere/metadata_0000.parquet", 20),  # by its file name
    ]
    t = pa.table(
        {
            "uid": [io.make_uid(a, b) for a, b, _, _ in rows],
            "url": [r[0] for r in rows],
            "caption": [r[1] for r in rows],
            "label": pa.array([0] * len(rows), pa.int32()),
            "source_file": pa.array([r[2] for r in rows], pa.string()),
            "source_row": pa.array([r[3] for r in rows], pa.int64()),
        }
    )
    matches = _matches(str(tmp_path / "m"), t)
    out = str(tmp_path / "pool")
    stats = run_import(CFG, root, matches, out)
    assert stats["imported"] == 4
    assert stats["resolved_by"] == {"source_row": 4, "url_caption": 1, "url": 1}
    assert stats["missing_by_reason"] == {"bad_vector": 1, "not_in_folder": 1, "url_mismatch": 1}
    missing = io.read_parquet(io.join(out, MISSING)).to_pylist()
    assert {(r["url"], r["reason"]) for r in missing} == {
        ("http://gone.test/x.jpg", "not_in_folder"),
        (u[3], "url_mismatch"),
        (u[47], "bad_vector"),
    }
    uids, _, feats = E.load(out)
    table, _ = E.load_table(out)
    got = dict(zip(uids.tolist(), feats.astype(np.float32)))
    vecs = unit(made["vectors"])
    for (url, cap, _, _), row in zip(rows, [5, 12, 50, None, None, None, 20]):
        if row is not None:
            np.testing.assert_allclose(got[io.make_uid(url, cap)], vecs[row], atol=1e-3)
    # The url-only join took the folder's row 50 (file 1, row 10).
    joined = table.filter(pa.compute.equal(table.column("url"), u[50])).to_pylist()[0]
    assert joined["source_row"] == 10 and joined["source_file"] == made["meta"][1]


def test_import_needs_the_model_and_resumes(tmp_path):
    root = str(tmp_path / "laion")
    made = make_folder(root, sizes=(10, 10))
    t = pa.table(
        {
            "uid": [io.make_uid(a, b) for a, b in zip(made["urls"], made["captions"])],
            "url": made["urls"],
            "caption": made["captions"],
            "label": pa.array([1] * 20, pa.int32()),
        }
    )
    matches = _matches(str(tmp_path / "m"), t)
    out = str(tmp_path / "pool")
    with pytest.raises(io.InputError, match="--model NAME"):
        run_import(PrecomputedConfig(), root, matches, out)
    run_import(CFG, root, matches, out)
    shard = io.join(out, f"{E.completed_shards(out)[0]}.npy")
    before = os.path.getmtime(shard)
    # A failed run (no _SUCCESS) with the same inputs reuses its shards ...
    os.remove(io.join(out, io.SUCCESS))
    run_import(CFG, root, matches, out)
    assert os.path.getmtime(shard) == before
    # ... and other matches clear them.
    os.remove(io.join(out, io.SUCCESS))
    _matches(str(tmp_path / "m"), t.slice(0, 15))
    stats = run_import(CFG, root, matches, out)
    assert stats["imported"] == 15 and len(E.load(out)[0]) == 15


def _emb_dir(url, feats, labels, **meta):
    E.write_shard(url, "00000", [f"u{i}" for i in range(len(feats))], labels, unit(feats))
    io.write_json(io.join(url, E.META), {"embed_dim": feats.shape[1], **meta})
    io.mark_done(url)
    return url


def _text_dir(url, heads, **meta):
    return write_text_embeddings(url, unit(heads), **meta)


def test_mixing_models_fails_where_embeddings_are_combined(tmp_path):
    from pipeline.evaluate.stage import load_task
    from pipeline.select.filters import SelectConfig, run_clip_filter, run_transductive

    rng = np.random.default_rng(0)
    f = rng.standard_normal((12, 16))
    pool = _emb_dir(str(tmp_path / "pool"), f, [0, 1, 2] * 4, model="ViT-L-14", pretrained="openai")
    text = _text_dir(
        str(tmp_path / "text"), f[:3], model="ViT-B-16", pretrained="laion2b_s34b_b88k"
    )
    with pytest.raises(
        io.InputError, match=r"different models.*pool by ViT-L-14 \(openai\).*text by ViT-B-16"
    ):
        run_clip_filter(SelectConfig(), pool, text, str(tmp_path / "d"))
    same_model = _text_dir(
        str(tmp_path / "t2"), f[:3], model="ViT-L-14", pretrained="laion400m_e32"
    )
    with pytest.raises(io.InputError, match="different models"):
        run_transductive(SelectConfig(), pool, pool, str(tmp_path / "d2"), same_model)
    ds_yaml = tmp_path / "d.yaml"
    ds_yaml.write_text("name: D\nclasses: [class0, class1, class2]\n")
    test = _emb_dir(str(tmp_path / "test"), f, [0, 1, 2] * 4, model="ViT-B-16")
    with pytest.raises(io.InputError, match="different models"):
        load_task(str(ds_yaml), test, test, text, pool)
    # Inputs that record no model are not compared; one model throughout passes.
    E.check_same_model({"a": {"embed_dim": 16}, "b": {"model": "X"}, "c": None})
    E.check_same_model({"a": pool, "b": {"model": "ViT-L-14"}})
    ok_text = _text_dir(str(tmp_path / "t3"), f[:3], model="ViT-L-14", pretrained="openai")
    assert run_clip_filter(SelectConfig(), pool, ok_text, str(tmp_path / "d3"))["pool"] == 12
    # A decision stands for its pool.
    with pytest.raises(io.InputError, match="different models"):
        E.check_same_model({"decision": str(tmp_path / "d3"), "text": text})
