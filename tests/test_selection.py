"""Issue 6: FAISS search against brute force, the two filters' rules, decisions, materialise."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from pipeline import embeddings as E
from pipeline import io
from pipeline.knn import KnnConfig, recall_at_k, search, topk_numpy
from pipeline.selection import SelectConfig, clip_score_decision, run_clip_filter, run_transductive


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng, n, d=32, centers=20, spread=0.3):
    c = unit(rng.standard_normal((centers, d)))
    lab = rng.integers(0, centers, n)
    return unit(c[lab] + spread * rng.standard_normal((n, d)) / np.sqrt(d)), lab


def test_exact_search_matches_brute_force():
    rng = np.random.default_rng(0)
    pool, q = unit(rng.standard_normal((3000, 48))), unit(rng.standard_normal((200, 48)))
    s, i = search(q, pool, 10)
    rs, ri = topk_numpy(q, pool, 10)
    assert (i == ri).all()
    np.testing.assert_allclose(s, rs, atol=1e-5)
    # k larger than the pool pads with -1 / -inf.
    s, i = search(q[:3], pool[:4], 6)
    assert (i[:, 4:] == -1).all() and np.isinf(s[:, 4:]).all()


def test_ivf_reaches_claimed_recall():
    rng = np.random.default_rng(1)
    pool, _ = clustered(rng, 20000)
    q, _ = clustered(rng, 300)
    cfg = KnnConfig(exact_max_pool=1000, nlist=64, nprobe=16, train_size=20000)
    _, i = search(q, pool, 10, cfg)
    _, truth = topk_numpy(q, pool, 10)
    assert recall_at_k(i, truth) >= 0.95


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
    np.testing.assert_allclose(t.column("prob").to_numpy(), p[np.arange(400), labels], rtol=1e-4, atol=1e-6)


def _write_emb(url, uids, labels, feats, **meta):
    E.write_shard(url, "00000", list(uids), labels, feats)
    io.write_json(io.join(url, E.META), {"embed_dim": feats.shape[1], **meta})
    io.mark_done(url)


def _text(url, heads):
    c = len(heads)
    E.write_shard(url, "text", [f"t{i}" for i in range(c)], list(range(c)), heads, extra={"kind": ["template"] * c, "prompt": [f"p{i}" for i in range(c)]})
    io.write_json(io.join(url, E.META), {"num_classes": c, "classnames": [f"class{i}" for i in range(c)], "embed_dim": heads.shape[1]})
    io.mark_done(url)


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
    assert set(np.asarray(t.column("uid").to_pylist())[t.column("kept").to_numpy(zero_copy_only=False)]) == kept
    nq = dict(zip(t.column("uid").to_pylist(), t.column("n_queries").to_pylist()))
    assert sum(nq.values()) == 30 * 5
    assert stats["kept"] == len(kept)
    out2 = str(tmp_path / "k")
    stats = run_transductive(SelectConfig(k=5, mode="kshot"), d["pool"], d["queries"], out2, d["text"])
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
    assert E.read_meta(t_out)["pool"] == d["pool"]


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
    s = run_transductive(SelectConfig(k=2), io.join(s3_bucket, "pool"), io.join(s3_bucket, "queries"), out, io.join(s3_bucket, "text"))
    assert s["kept"] > 0 and io.is_done(out)
    assert len(E.load(out)[0]) == s["kept"]


def test_materialise_both_formats(tmp_path):
    import json
    import tarfile
    import io as _io

    import webdataset as wds

    from pipeline.imageserver import fashion_mnist_bytes
    from pipeline.materialise import run_materialise

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tf:
        for i in range(6):
            for ext, data in (("jpg", fashion_mnist_bytes("train", i)), ("txt", f"cap {i}".encode()), ("json", json.dumps({"uid": f"u{i}", "label": i % 2, "class_name": ["T-shirt", "ankle boot"][i % 2]}).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, _io.BytesIO(data))
        evil = b"x"
        info = tarfile.TarInfo("../../escape.jpg")
        info.size = 1
        tf.addfile(info, _io.BytesIO(evil))
    dec = str(tmp_path / "dec")
    kept = [True, False, True, True, False, True]
    E.write_decision(dec, pa.table({"uid": [f"u{i}" for i in range(6)], "label": [i % 2 for i in range(6)], "score": [0.5] * 6, "kept": kept, "reason": ["kept" if k else "not_in_topk" for k in kept]}), {"pool": "x"}, {})
    wd = str(tmp_path / "wd")
    s = run_materialise(dec, str(shards), wd, "webdataset")
    assert s["written"] == 4
    got = {json.loads(x["json"])["uid"] for x in wds.WebDataset(os.path.join(wd, "00000.tar"), shardshuffle=False)}
    assert got == {"u0", "u2", "u3", "u5"}
    imf = str(tmp_path / "imf")
    run_materialise(dec, str(shards), imf, "imagefolder")
    assert sorted(d for d in os.listdir(imf) if not d.endswith((".parquet", ".json")) and d != "_SUCCESS") == ["0000_T-shirt", "0001_ankle_boot"]
    assert sorted(os.listdir(os.path.join(imf, "0001_ankle_boot"))) == ["u3.jpg", "u5.jpg"]
    manifest = io.read_parquet(io.join(imf, "manifest.parquet"))
    assert set(manifest.column("caption").to_pylist()) == {"cap 0", "cap 2", "cap 3", "cap 5"}
    assert not (tmp_path / "escape.jpg").exists() and not os.path.exists(os.path.join(os.path.dirname(str(tmp_path)), "escape.jpg"))
