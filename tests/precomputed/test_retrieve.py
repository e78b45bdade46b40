"""Issue 21: knn-retrieve against brute force (exact and IVF-PQ, local and loopback S3, index
reuse, a foreign index), export to the clip-retrieval layout and back, a folder made by
embedding real images with the tiny model, candidate unions and selection before download."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.app.cli import main
from pipeline.core import embeddings as E
from pipeline.core import io
from pipeline.core.config import load_dataset
from pipeline.demo.embedding_folder import make_folder, unit
from pipeline.precomputed.candidates import (
    kept_candidates,
    serves_run,
    union_candidates,
    write_kept,
    write_union,
)
from pipeline.precomputed.config import PrecomputedConfig
from pipeline.precomputed.export import export_embeddings
from pipeline.precomputed.importer import run_import
from pipeline.precomputed.layout import open_folder
from pipeline.precomputed.reader import read_all
from pipeline.precomputed.retrieve import INDEX_DIR, INDEX_FILE, PART, group_hits, run_knn_retrieve
from pipeline.precomputed.search import block_topk
from pipeline.select.knn import recall_at_k, topk_numpy
from tests.embedding_dirs import write_text_embeddings

MODEL = {"model": "ViT-L-14", "pretrained": "openai"}


def _emb_dir(url, feats, labels, uids=None, **meta):
    uids = uids or [f"q{i:04d}" for i in range(len(feats))]
    E.write_shard(url, "00000", uids, labels, unit(feats))
    io.write_json(io.join(url, E.META), {"embed_dim": feats.shape[1], "kind": "image", **meta})
    io.mark_done(url)
    return url


def _text_dir(url, heads, **meta):
    c = len(heads)
    # Two template prompts per class around its head: the query is their normalised mean.
    rng = np.random.default_rng(7)
    prompts = np.concatenate([heads + 0.3 * rng.standard_normal(heads.shape) for _ in range(2)])
    return write_text_embeddings(url, unit(prompts), list(range(c)) * 2, **meta)


def _global_ids(folder, table):
    pos = folder.file_of(table.column("source_file").to_pylist())
    return folder.starts()[pos] + table.column("source_row").to_numpy()


def _reference_pairs(queries, labels, pool, k):
    """Brute force: (row, label) -> best score over the queries that have the row in their top k."""
    s, i = topk_numpy(queries, pool, k)
    want: dict = {}
    for q in range(len(queries)):
        for score, row in zip(s[q], i[q]):
            key = (int(row), int(labels[q]))
            want[key] = max(want.get(key, -np.inf), float(score))
    return want


@pytest.mark.parametrize("where", ["local", "s3"])
def test_exact_knn_text_and_image_queries_match_brute_force(tmp_path, where, request):
    root = (
        str(tmp_path / "f")
        if where == "local"
        else io.join(request.getfixturevalue("s3_bucket"), "f")
    )
    made = make_folder(root, sizes=(300, 500, 200), centers=4, dtypes=("float16", "float32"))
    pool = unit(made["vectors"])
    rng = np.random.default_rng(3)
    heads = rng.standard_normal((4, 16))
    text = _text_dir(str(tmp_path / "text"), heads, **MODEL)
    out = str(tmp_path / "knn-text")
    cfg = PrecomputedConfig(k=7, **MODEL)
    stats = run_knn_retrieve(cfg, root, text, out)
    got = io.read_parquet(io.join(out, PART))
    folder = open_folder(root)
    te = E.load_text(text)
    want = _reference_pairs(te.heads("template"), np.arange(4), pool, 7)
    ids = _global_ids(folder, got)
    pairs = dict(
        zip(zip(ids.tolist(), got.column("label").to_pylist()), got.column("score").to_pylist())
    )
    assert pairs.keys() == want.keys() and stats["knn"]["index"] == "exact"
    assert not io.exists(io.join(out, INDEX_DIR))  # the folder is its own exact index
    np.testing.assert_allclose([pairs[k] for k in want], list(want.values()), atol=1e-5)
    assert set(got.column("source").to_pylist()) == {"knn-text"}
    assert got.column("class_name").to_pylist() == [
        f"class{c}" for c in got.column("label").to_pylist()
    ]
    # Each candidate row is its folder row: uid from that row's url and caption.
    for row, uid, url in zip(
        ids.tolist(), got.column("uid").to_pylist(), got.column("url").to_pylist()
    ):
        assert url == made["urls"][row] and uid == io.make_uid(url, made["captions"][row])
    # Rows sorted by label, then score.
    lab, sc = got.column("label").to_numpy(), got.column("score").to_numpy()
    assert np.all(np.diff(lab) >= 0) and all(np.all(np.diff(sc[lab == c]) <= 0) for c in range(4))
    # Image queries: each task image's k neighbours, one row per (folder row, label).
    q = pool[rng.choice(len(pool), 25, replace=False)] + 0.05 * rng.standard_normal((25, 16))
    qlabels = rng.integers(0, 4, 25)
    task = _emb_dir(str(tmp_path / "task"), q, qlabels, **MODEL)
    out = str(tmp_path / "knn-image")
    assert (
        main(["knn-retrieve", "--source", root, "--queries", task, "--k", "5", "--out", out]) == 0
    )
    got = io.read_parquet(io.join(out, PART))
    want = _reference_pairs(unit(E.load(task)[2]), qlabels, pool, 5)  # queries as stored (float16)
    ids = _global_ids(folder, got)
    pairs = dict(
        zip(zip(ids.tolist(), got.column("label").to_pylist()), got.column("score").to_pylist())
    )
    assert pairs.keys() == want.keys() and set(got.column("source").to_pylist()) == {"knn-image"}
    np.testing.assert_allclose([pairs[k] for k in want], list(want.values()), atol=1e-5)
    assert sum(got.column("n_queries").to_pylist()) == 25 * 5
    # The download stage and import take the candidates as they take text matches.
    from pipeline.download.stage import read_matches

    assert read_matches(out).num_rows == got.num_rows
    imp = str(tmp_path / "imported")
    stats = run_import(PrecomputedConfig(engine="local", **MODEL), root, out, imp)
    assert stats["imported"] == got.num_rows and stats["resolved_by"] == {
        "source_row": got.num_rows
    }


def test_queries_of_another_model_or_dimension_are_refused(tmp_path):
    root = str(tmp_path / "f")
    make_folder(root, sizes=(50,))
    text = _text_dir(str(tmp_path / "t"), np.eye(3, 16), model="ViT-B-16", pretrained="openai")
    with pytest.raises(io.InputError, match="different models"):
        run_knn_retrieve(PrecomputedConfig(**MODEL), root, text, str(tmp_path / "o"))
    small = _text_dir(str(tmp_path / "t8"), np.eye(3, 8), **MODEL)
    with pytest.raises(io.InputError, match="dimension 8 but .* has 16"):
        run_knn_retrieve(PrecomputedConfig(**MODEL), root, small, str(tmp_path / "o2"))


def test_streamed_topk_in_small_chunks_is_exact():
    rng = np.random.default_rng(4)
    x, q = unit(rng.standard_normal((100, 8))), unit(rng.standard_normal((5, 8)))
    best = (np.full((5, 0), -np.inf, np.float32), np.zeros((5, 0), np.int64))
    for first in (0, 60):  # two "files"
        best = block_topk(*best, q, x[first : first + 60], first, 6, chunk=7)
    _, want = topk_numpy(q, x, 6)
    assert [set(r) for r in best[1].tolist()] == [set(r) for r in want.tolist()]


def test_calibration_stops_at_a_recall_plateau():
    from pipeline.select.knn import calibrate_nprobe

    truth = np.arange(1000)[None, :]
    recall = {1: 0.5, 2: 0.8, 4: 0.9, 8: 0.901, 16: 0.95, 32: 1.0}
    seen = []

    def found_at(nprobe):
        seen.append(nprobe)
        n = int(round(recall[nprobe] * 1000))
        return np.where(np.arange(1000) < n, truth, -1)

    assert calibrate_nprobe(found_at, truth, 32, 0.95) == (16, 0.95)
    seen.clear()
    assert calibrate_nprobe(found_at, truth, 32, 0.95, min_gain=0.002) == (8, 0.901)
    assert seen == [1, 2, 4, 8]


def test_group_hits_keeps_the_best_query_per_row_and_label():
    scores = np.array([[0.9, 0.5, -np.inf], [0.7, 0.9, 0.1]], np.float32)
    ids = np.array([[4, 2, -1], [2, 4, 8]])
    rows, labels, best, count, query = group_hits(np.array([1, 1]), scores, ids)
    assert rows.tolist() == [4, 2, 8] and labels.tolist() == [1, 1, 1]
    np.testing.assert_allclose(best, [0.9, 0.7, 0.1])
    assert count.tolist() == [2, 2, 1] and query.tolist() == [0, 1, 1]  # a tie goes to query 0
    rows, labels, _, count, _ = group_hits(np.array([0, 1]), scores, ids)
    assert sorted(zip(labels.tolist(), rows.tolist())) == [(0, 2), (0, 4), (1, 2), (1, 4), (1, 8)]


def test_ivfpq_recall_index_reuse_and_a_foreign_index(tmp_path):
    import faiss

    root = str(tmp_path / "f")
    made = make_folder(root, sizes=(1500, 2500, 2000), dim=32, centers=40, dtypes=("float16",))
    pool = unit(made["vectors"])
    rng = np.random.default_rng(5)
    q = pool[rng.choice(len(pool), 60, replace=False)] + 0.1 * rng.standard_normal((60, 32))
    # A label per query, so every (row, label) candidate row belongs to one query.
    task = _emb_dir(str(tmp_path / "task"), q, np.arange(60), **MODEL)
    q = unit(E.load(task)[2])  # as stored (float16)
    cfg = PrecomputedConfig(k=10, exact_max_rows=1000, pq_m=8, rerank=8, threads=1, **MODEL)
    out = str(tmp_path / "a")
    stats = run_knn_retrieve(cfg, root, task, out)
    info = stats["knn"]
    assert info["index"] == "ivfpq" and info["pq_m"] == 8 and info["nlist"] == 150
    assert info["calibration_recall"] >= 0.95 and 1 <= info["nprobe"] < info["nlist"]
    folder = open_folder(root)
    got = io.read_parquet(io.join(out, PART))
    _, truth = topk_numpy(q, pool, 10)
    # Recall over every query (not only the calibration sample) is near the claim.
    names = [f"q{i:04d}" for i in range(60)]
    s, i = _search_rows(got, folder, names)
    assert recall_at_k(i, truth) >= 0.9
    # Scores are exact (rescored from the folder's vectors).
    np.testing.assert_allclose(
        s[i >= 0], np.einsum("qd,qd->q", q[np.nonzero(i >= 0)[0]], pool[i[i >= 0]]), atol=1e-5
    )
    # The saved index is read back: the same candidates, no rebuild.
    index_url = io.join(out, INDEX_DIR, INDEX_FILE)
    assert io.read_json(index_url + ".json")["nprobe"] == info["nprobe"]
    out2 = str(tmp_path / "b")
    stats2 = run_knn_retrieve(cfg, index_url, task, out2)
    assert stats2["knn"]["loaded"] and stats2["knn"]["nprobe"] == info["nprobe"]
    assert io.read_parquet(io.join(out2, PART)).equals(got)
    # A foreign index (autofaiss's, say) needs --folder; its ids are the folder's rows in order.
    flat = faiss.IndexFlatIP(32)
    flat.add(np.concatenate([unit(read_all(f.emb, f.header)) for f in folder.files]))
    foreign = str(tmp_path / "knn.index")
    faiss.write_index(flat, foreign)
    with pytest.raises(io.InputError, match="needs --folder ROOT"):
        run_knn_retrieve(cfg, foreign, task, str(tmp_path / "c"))
    run_knn_retrieve(cfg, foreign, task, str(tmp_path / "c"), folder_root=root)
    got3 = io.read_parquet(io.join(str(tmp_path / "c"), PART))
    _, i3 = _search_rows(got3, folder, names)
    assert recall_at_k(i3, truth) == 1.0
    small = faiss.IndexFlatIP(32)
    small.add(pool[:10])
    faiss.write_index(small, str(tmp_path / "small.index"))
    with pytest.raises(io.InputError, match="holds 10 vectors of dim 32 but .* has 6000 rows"):
        run_knn_retrieve(
            cfg, str(tmp_path / "small.index"), task, str(tmp_path / "d"), folder_root=root
        )


def _search_rows(table, folder, names, k=10):
    """Per query name, its candidate rows and scores as [Q, k] arrays (best first)."""
    s = np.full((len(names), k), -np.inf, np.float32)
    i = np.full((len(names), k), -1, np.int64)
    ids = _global_ids(folder, table)
    per: dict = {}
    for row, qn, sc in zip(
        ids.tolist(), table.column("query").to_pylist(), table.column("score").to_pylist()
    ):
        per.setdefault(qn, []).append((sc, row))
    for qi, name in enumerate(names):
        got = sorted(per.get(name, []), key=lambda t: (-t[0], t[1]))[:k]
        for j, (sc, row) in enumerate(got):
            s[qi, j], i[qi, j] = sc, row
    return s, i


def test_export_round_trip_through_import(tmp_path):
    root = str(tmp_path / "f")
    made = make_folder(root, sizes=(120, 80))
    pick = np.arange(0, 200, 3)
    t = pa.table(
        {
            "uid": [io.make_uid(made["urls"][i], made["captions"][i]) for i in pick],
            "url": [made["urls"][i] for i in pick],
            "caption": [made["captions"][i] for i in pick],
            "label": pa.array(pick % 5, pa.int32()),
        }
    )
    matches = str(tmp_path / "m")
    io.write_parquet(t, io.join(matches, "part-00000.parquet"))
    io.mark_done(matches)
    cfg = PrecomputedConfig(engine="local", **MODEL)
    pool = str(tmp_path / "pool")
    run_import(cfg, root, matches, pool)
    out = str(tmp_path / "export")
    assert main(["export-embeddings", "--src", pool, "--out", out]) == 0
    folder = open_folder(out)
    uids, labels, feats = E.load(pool)
    assert folder.rows == len(uids) and [f.number for f in folder.files] == [0, 1]
    exported = np.concatenate([read_all(f.emb, f.header) for f in folder.files])
    np.testing.assert_array_equal(exported, feats)
    meta = io.read_parquet(io.join(out, "metadata"))
    assert meta.column_names[:4] == ["url", "caption", "uid", "label"]
    assert meta.column("uid").to_pylist() == uids.tolist()
    assert E.read_meta(out)["model"] == "ViT-L-14"
    # Import from the exported folder (matches without source rows: joined on URL).
    again = str(tmp_path / "again")
    stats = run_import(cfg, out, matches, again)
    assert stats["resolved_by"] == {"url_caption": len(pick)}
    u2, l2, f2 = E.load(again)
    assert sorted(u2.tolist()) == sorted(uids.tolist())
    order = {u: j for j, u in enumerate(uids.tolist())}
    np.testing.assert_array_equal(f2, feats[[order[u] for u in u2]])
    np.testing.assert_array_equal(l2, labels[[order[u] for u in u2]])


def test_folder_of_real_images_embedded_with_the_tiny_model(tmp_path, tiny_model_name):
    """Fashion-MNIST images embedded by the tiny open_clip model, exported to the clip-retrieval
    layout (url and caption from matches), then retrieved from: every image finds itself first,
    and class-prompt queries agree with brute force."""
    from pipeline.demo.run import write_task_imagefolder
    from pipeline.embed.config import EmbedConfig
    from pipeline.embed.task import embed_task
    from pipeline.embed.text import embed_text

    ecfg = EmbedConfig(
        model=tiny_model_name, pretrained="none", device="cpu", batch_size=16, workers=0
    )
    images = str(tmp_path / "images")
    write_task_imagefolder(images, train_per_class=4, test_per_class=1)
    emb = str(tmp_path / "emb")
    embed_task(ecfg, "FashionMNIST", "train", images, emb)
    uids, labels, feats = E.load(emb)
    m = pa.table(
        {
            "uid": uids.tolist(),
            "url": [f"http://127.0.0.1:9/img/{u}.jpg" for u in uids],
            "caption": [f"image {u}" for u in uids],
        }
    )
    matches = str(tmp_path / "m")
    io.write_parquet(m, io.join(matches, "part-00000.parquet"))
    io.mark_done(matches)
    folder_url = str(tmp_path / "folder")
    stats = export_embeddings(PrecomputedConfig(), emb, folder_url, matches)
    assert stats == {"files": 1, "rows": 40, "rows_without_url": 0}
    out = str(tmp_path / "self")
    run_knn_retrieve(PrecomputedConfig(k=3), folder_url, emb, out, dataset="FashionMNIST")
    got = io.read_parquet(io.join(out, PART))
    # Each image is its own nearest row: the exported row of its uid, chosen by itself.
    exported_uid = io.read_parquet(io.join(folder_url, "metadata")).column("uid").to_pylist()
    rows, queries = got.column("source_row").to_pylist(), got.column("query").to_pylist()
    assert sum(q == exported_uid[r] for q, r in zip(queries, rows)) == 40
    names = load_dataset("FashionMNIST").classes
    assert got.column("class_name").to_pylist() == [
        names[c] for c in got.column("label").to_pylist()
    ]
    text = str(tmp_path / "text")
    embed_text(ecfg, "FashionMNIST", text)
    out = str(tmp_path / "knn-text")
    run_knn_retrieve(PrecomputedConfig(k=4), folder_url, text, out)
    got = io.read_parquet(io.join(out, PART))
    heads = E.load_text(text).heads("template")
    want = _reference_pairs(heads, np.arange(10), unit(feats), 4)
    pairs = set(zip(got.column("source_row").to_pylist(), got.column("label").to_pylist()))
    assert pairs == set(want)


def test_union_dedups_by_url_and_keeps_sources():
    text = pa.table(
        {
            "uid": ["a", "b", "c"],
            "url": ["u1", "u2", "u3"],
            "caption": ["x", "y", "z"],
            "label": pa.array([0, 1, 2], pa.int32()),
            "matched_term": ["m", "m", "m"],
        }
    )
    knn_text = pa.table(
        {
            "uid": ["d", "e", "f"],
            "url": ["u2", "u4", None],
            "caption": ["y2", "w", "v"],
            "label": pa.array([1, 0, 0], pa.int32()),
            "score": pa.array([0.5, 0.4, 0.3], pa.float32()),
            "source": ["knn-text"] * 3,
        }
    )
    knn_image = knn_text.slice(0, 2).set_column(5, "source", pa.array(["knn-image"] * 2))
    knn_image = knn_image.set_column(3, "label", pa.array([2, 0], pa.int32()))
    out, stats = union_candidates({"text": text, "knn-text": knn_text, "knn-image": knn_image})
    assert out.column("url").to_pylist() == ["u1", "u2", "u3", "u4"]
    assert out.column("source").to_pylist() == ["text", "text", "text", "knn-text"]
    assert out.column("sources").to_pylist() == [
        "text",
        "text,knn-text,knn-image",
        "text",
        "knn-text,knn-image",
    ]
    assert out.column("uid").to_pylist() == ["a", "b", "c", "e"]
    assert stats["urls_found_by_several_sources"] == 2 and stats["dropped_no_url"] == 1
    assert stats["rows_with_another_label_than_kept"] == 1  # u2 as label 2 by knn-image
    assert out.column("score").to_pylist()[3] == pytest.approx(0.4)
    assert kept_candidates(out, np.array(["e", "a"], object)).column("uid").to_pylist() == [
        "a",
        "e",
    ]


def test_select_before_download(tmp_path):
    """The order ``primer subset --embeddings`` runs: candidates (text + knn-text) -> import ->
    CLIP filter -> transductive -> the kept candidates; only those would be downloaded."""
    from pipeline.select.filters import SelectConfig, run_clip_filter, run_transductive

    root = str(tmp_path / "f")
    made = make_folder(root, sizes=(400, 400), centers=3, seed=2)
    rng = np.random.default_rng(0)
    heads = rng.standard_normal((3, 16))
    text = _text_dir(str(tmp_path / "text"), heads, **MODEL)
    # "Text matches": 60 rows with a caption label each, and their source rows.
    rows = rng.choice(800, 60, replace=False)
    tm = pa.table(
        {
            "uid": [io.make_uid(made["urls"][r], made["captions"][r]) for r in rows],
            "url": [made["urls"][r] for r in rows],
            "caption": [made["captions"][r] for r in rows],
            "label": pa.array(rng.integers(0, 3, 60), pa.int32()),
            "class_name": [None] * 60,
            "source_file": [made["meta"][r // 400] for r in rows],
            "source_row": pa.array(rows % 400, pa.int64()),
        }
    )
    text_matches = str(tmp_path / "text-matches")
    io.write_parquet(tm, io.join(text_matches, "part-00000.parquet"))
    io.mark_done(text_matches)
    cfg = PrecomputedConfig(k=30, engine="local", **MODEL)
    knn = str(tmp_path / "knn-text")
    run_knn_retrieve(cfg, root, text, knn)
    cands = str(tmp_path / "candidates")
    ustats = write_union({"text": text_matches, "knn-text": knn}, cands)
    n_cand = io.read_parquet(cands).num_rows
    assert n_cand == ustats["urls"] and 60 < n_cand <= 60 + 90
    pool = str(tmp_path / "pool")
    assert run_import(cfg, root, cands, pool)["imported"] == n_cand
    clip = str(tmp_path / "clip")
    run_clip_filter(SelectConfig(min_prob=0.2), pool, text, clip)
    task = _emb_dir(str(tmp_path / "task"), unit(made["vectors"][:20]), np.zeros(20, int), **MODEL)
    trans = str(tmp_path / "trans")
    run_transductive(SelectConfig(k=5), clip, task, trans, text)
    kept = str(tmp_path / "kept")
    stats = write_kept(cands, trans, kept)
    kept_uids = set(E.decision_kept(trans).tolist())
    got = io.read_parquet(kept)
    assert set(got.column("uid").to_pylist()) == kept_uids and 0 < len(kept_uids) < n_cand
    assert stats["downloads_avoided"] == n_cand - len(kept_uids)
    assert serves_run(pool, "ViT-L-14", "openai") and not serves_run(pool, "ViT-B-16", "openai")
