"""Issue 6: the CLIP-score and transductive filters: rules against numpy, decisions, CLI, S3."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.app.cli import main
from pipeline.core import embeddings as E
from pipeline.core import io
from pipeline.select.filters import (
    SelectConfig,
    clip_score_decision,
    run_clip_filter,
    run_transductive,
    zero_shot,
)
from pipeline.select.knn import topk_numpy
from tests.embedding_dirs import write_text_embeddings


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_clip_filter_matches_direct_numpy(tmp_path):
    rng = np.random.default_rng(2)
    heads = unit(rng.standard_normal((5, 16)))
    feats = unit(heads[rng.integers(0, 5, 400)] + 0.8 * rng.standard_normal((400, 16)))
    labels = rng.integers(0, 5, 400)
    uids = np.array([f"u{i}" for i in range(400)], dtype=object)
    cfg = SelectConfig(min_prob=0.3, require_agreement=True)
    t = clip_score_decision(uids, labels, feats, heads, cfg)
    logits = 100 * feats @ heads.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = (p[np.arange(400), labels] >= 0.3) & (p.argmax(1) == labels)
    assert (t.column("kept").to_numpy(zero_copy_only=False) == want).all()
    assert 0 < want.sum() < 400
    np.testing.assert_allclose(
        t.column("prob").to_numpy(), p[np.arange(400), labels], rtol=1e-4, atol=1e-6
    )


def _write_emb(url, uids, labels, feats, **meta):
    E.write_shard(url, "00000", list(uids), labels, feats)
    io.write_json(io.join(url, E.META), {"embed_dim": feats.shape[1], **meta})
    io.mark_done(url)


def _text(url, heads):
    write_text_embeddings(url, heads)


@pytest.fixture
def world(tmp_path):
    rng = np.random.default_rng(3)
    heads = unit(rng.standard_normal((4, 16)))
    pl = np.repeat(np.arange(4), 50)
    pool = unit(heads[pl] + 0.7 * rng.standard_normal((200, 16)))
    ql = np.repeat(np.arange(3), 10)  # class 3 has no queries
    queries = unit(heads[ql] + 0.7 * rng.standard_normal((30, 16)))
    d = {k: str(tmp_path / k) for k in ("pool", "queries", "text")}
    _write_emb(d["pool"], [f"p{i:03d}" for i in range(200)], pl, pool)
    _write_emb(d["queries"], [f"q{i:03d}" for i in range(30)], ql, queries)
    _text(d["text"], heads)
    return d, pool, pl, queries, ql


def test_transductive_union_and_kshot_never_crosses_classes(tmp_path, world):
    d, pool, pl, q, ql = world
    out = str(tmp_path / "t")
    stats = run_transductive(SelectConfig(k=5), d["pool"], d["queries"], out, d["text"])
    t = E.read_decision(out)
    _, truth = topk_numpy(q, pool, 5)
    kept = {f"p{i:03d}" for i in np.unique(truth)}
    assert (
        set(
            np.asarray(t.column("uid").to_pylist())[t.column("kept").to_numpy(zero_copy_only=False)]
        )
        == kept
    )
    nq = dict(zip(t.column("uid").to_pylist(), t.column("n_queries").to_pylist()))
    assert sum(nq.values()) == 30 * 5
    assert stats["kept"] == len(kept)
    out2 = str(tmp_path / "k")
    stats = run_transductive(
        SelectConfig(k=5, mode="kshot"), d["pool"], d["queries"], out2, d["text"]
    )
    t2 = E.read_decision(out2)
    kept_labels = set(t2.filter(t2.column("kept")).column("label").to_pylist())
    assert kept_labels <= set(ql.tolist())
    # The query's own class only: each query's neighbours are searched among its label's pool rows.
    assert stats["empty_classes"] == ["class3"]


def test_decisions_are_byte_identical_across_runs_and_chain(tmp_path, world):
    d, *_ = world
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_clip_filter(SelectConfig(min_prob=0.2), d["pool"], d["text"], a)
    run_clip_filter(SelectConfig(min_prob=0.2), d["pool"], d["text"], b)
    for name in ("decision.parquet", "meta.json"):
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read()
    # A transductive filter that starts from the CLIP filter's decision only keeps its kept rows.
    t_out = str(tmp_path / "t")
    run_transductive(SelectConfig(k=3), a, d["queries"], t_out, d["text"])
    clip_kept = set(E.decision_kept(a))
    assert set(E.decision_kept(t_out)) <= clip_kept
    assert E.decision_pool(t_out) == d["pool"]
    assert E.read_meta(t_out)["pool"] == "../pool"  # relative: the directory tree can move
    # Transductive reruns, exact and IVF, give the same bytes too.
    for cfg in (SelectConfig(k=3), SelectConfig(k=3, exact_max_pool=50)):
        x, y = str(tmp_path / "x"), str(tmp_path / "y")
        run_transductive(cfg, d["pool"], d["queries"], x, overwrite=True)
        run_transductive(cfg, d["pool"], d["queries"], y, overwrite=True)
        for name in ("decision.parquet", "meta.json"):
            assert (
                open(os.path.join(x, name), "rb").read() == open(os.path.join(y, name), "rb").read()
            )
    assert io.read_json(os.path.join(y, "stats.json"))["knn"]["index"] == "ivf"


def test_empty_class_reported_not_crash(tmp_path, world):
    d, pool, pl, *_ = world
    few = str(tmp_path / "few")
    _write_emb(few, [f"p{i:03d}" for i in range(150)], pl[:150], pool[:150])  # no class-3 images
    s = run_clip_filter(SelectConfig(), few, d["text"], str(tmp_path / "c"))
    assert s["empty_classes"] == ["class3"] and s["per_class_kept"]["class3"] == 0
    empty = str(tmp_path / "empty")
    _write_emb(empty, [], np.zeros(0, int), np.zeros((0, 16), np.float32))
    s = run_transductive(SelectConfig(k=3), empty, d["queries"], str(tmp_path / "t"), d["text"])
    assert s["kept"] == 0 and len(s["empty_classes"]) == 4


def test_filters_read_and_write_s3(world, s3_bucket):
    d, *_ = world
    fs, _ = io.url_to_fs(s3_bucket)
    for k in ("pool", "queries", "text"):
        fs.put(d[k], f"{s3_bucket}/{k}", recursive=True)
    out = io.join(s3_bucket, "decision")
    s = run_transductive(
        SelectConfig(k=2),
        io.join(s3_bucket, "pool"),
        io.join(s3_bucket, "queries"),
        out,
        io.join(s3_bucket, "text"),
    )
    assert s["kept"] > 0 and io.is_done(out)
    assert len(E.load(out)[0]) == s["kept"]


def test_clip_filter_reasons_and_unknown_labels():
    rng = np.random.default_rng(5)
    heads = unit(rng.standard_normal((3, 8)))
    feats = unit(heads[[0, 1, 2, 0]] + 0.01 * rng.standard_normal((4, 8)))
    labels = np.array([0, 2, 7, -1])  # agrees, disagrees, out of range, unlabelled
    t = clip_score_decision(
        np.array(["a", "b", "c", "d"], dtype=object),
        labels,
        feats,
        heads,
        SelectConfig(min_prob=0.5, require_agreement=True),
    )
    assert t.column("reason").to_pylist() == [
        "kept",
        "label_disagrees",
        "label_unknown",
        "label_unknown",
    ]
    assert t.column("pred").to_pylist() == [0, 1, 2, 0]
    # Batching changes only the last bits (BLAS blocking), never the decision.
    a = clip_score_decision(
        np.array(list("abcd"), dtype=object), labels, feats, heads, SelectConfig(batch=1)
    )
    b = clip_score_decision(
        np.array(list("abcd"), dtype=object), labels, feats, heads, SelectConfig(batch=4)
    )
    assert a.select(["kept", "reason", "pred"]).equals(b.select(["kept", "reason", "pred"]))
    np.testing.assert_allclose(
        a.column("prob").to_numpy(), b.column("prob").to_numpy(), rtol=1e-4, atol=1e-7
    )


def test_transductive_per_class_uses_predicted_class(tmp_path, world):
    d, pool, pl, q, ql = world
    out = str(tmp_path / "pc")
    with pytest.raises(io.InputError, match="--text"):
        run_transductive(SelectConfig(k=4, mode="per_class"), d["pool"], d["queries"], out)
    run_transductive(SelectConfig(k=4, mode="per_class"), d["pool"], d["queries"], out, d["text"])
    heads = E.load_text(d["text"]).heads("template")
    pred, _ = zero_shot(E.load(d["queries"])[2], heads)
    t = E.read_decision(out)
    kept = t.filter(t.column("kept"))
    assert set(kept.column("label").to_pylist()) == set(pred.tolist())
    assert sum(kept.column("n_queries").to_pylist()) == 30 * 4
    assert E.read_meta(out)["config"]["mode"] == "per_class"


def test_cli_end_to_end_rerun_skips_and_overwrite(tmp_path, world, capsys):
    d, *_ = world
    clip, trans = str(tmp_path / "clip"), str(tmp_path / "trans")
    assert (
        main(
            [
                "clip-filter",
                "--pool",
                d["pool"],
                "--text",
                d["text"],
                "--out",
                clip,
                "--min-prob",
                "0.3",
                "--require-agreement",
            ]
        )
        == 0
    )
    assert E.read_meta(clip)["config"] == {
        "min_prob": 0.3,
        "require_agreement": True,
        "logit_scale": 100.0,
    }
    argv = [
        "transductive",
        "--pool",
        clip,
        "--queries",
        d["queries"],
        "--text",
        d["text"],
        "--k",
        "3",
        "--kshot",
        "--out",
        trans,
    ]
    assert main(argv) == 0
    assert "kept" in capsys.readouterr().out
    mtime = os.path.getmtime(os.path.join(trans, "decision.parquet"))
    assert (
        main(argv) == 0 and os.path.getmtime(os.path.join(trans, "decision.parquet")) == mtime
    )  # skipped
    assert main([*argv[:-2], "--out", trans, "--overwrite", "--set", "select.k=1"]) == 0
    assert E.read_meta(trans)["config"]["k"] == 3  # the flag wins over --set
    # Bad inputs are clear errors, not tracebacks.
    assert (
        main(
            [
                "transductive",
                "--pool",
                str(tmp_path / "nope"),
                "--queries",
                d["queries"],
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "clip-filter",
                "--pool",
                d["pool"],
                "--text",
                d["text"],
                "--out",
                str(tmp_path / "y"),
                "--min-prob",
                "2",
            ]
        )
        == 2
    )


def test_mismatched_dimensions_are_an_input_error(tmp_path, world):
    d, *_ = world
    other = str(tmp_path / "q8")
    _write_emb(other, ["a", "b"], [0, 1], unit(np.eye(8)[:2]))
    with pytest.raises(io.InputError, match="dimensions differ"):
        run_transductive(SelectConfig(), d["pool"], other, str(tmp_path / "o"))
