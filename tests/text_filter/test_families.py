"""Issue 20: match rules through the stages. The text filter's candidates column and rule
counts, its resume fingerprint over the rules, and a family row (a caption naming a family of
classes, not which member) from the text filter through download and embed to the CLIP-score
filter, which picks its class by zero-shot among the candidates."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from pipeline.core import embeddings as E
from pipeline.core import io
from pipeline.core.config import load_dataset
from pipeline.select.filters import (
    SelectConfig,
    choose_among_candidates,
    clip_score_decision,
    run_clip_filter,
)
from pipeline.text_filter.config import TextFilterConfig
from pipeline.text_filter.stage import run_text_filter
from pipeline.text_filter.terms import MatchRules
from tests.embedding_dirs import write_text_embeddings

CARS = """\
name: Cars
classes: [Audi S5 Convertible 2012, Audi S5 Coupe 2012, rose, Ford F-150 Regular Cab 2007]
templates: ['a photo of a {}.']
synonyms: {Ford F-150 Regular Cab 2007: [Ford F-150]}
families: {Audi S5: [Audi S5 Convertible 2012, Audi S5 Coupe 2012]}
kind_words: {convertible: [Convertible], cabriolet: [Convertible], coupe: [Coupe], sedan: []}
class_kinds: {Audi S5 Convertible 2012: [Convertible], Audi S5 Coupe 2012: [Coupe]}
class_years: {Ford F-150 Regular Cab 2007: 2007}
max_year_gap: 15
exclude: {rose: [rose gold]}
"""
ROWS = [  # (caption, class name, candidates)
    ("Audi S5 for sale", "Audi S5 Convertible 2012", [0, 1]),
    ("2012 Audi S5 Cabriolet", "Audi S5 Convertible 2012", [0]),
    ("Audi S5 Coupe 2012 front view", "Audi S5 Coupe 2012", [1]),
    ("a red rose", "rose", [2]),
    ("rose gold ring", None, None),  # excluded
    ("Audi S5 sedan", None, None),  # contradicted: no S5 sedan class
    ("1962 Ford F150", None, None),  # contradicted: 45 years from the class
    ("2008 Ford F150", "Ford F-150 Regular Cab 2007", [3]),
]


def _yaml(tmp_path, text=CARS, name="cars.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _meta(tmp_path, rows, urls=None, name="in"):
    import pyarrow.parquet as pq

    from pipeline.demo.synthetic import laion_table

    d = tmp_path / name
    d.mkdir(exist_ok=True)
    urls = urls or [f"http://a.test/{i}.jpg" for i in range(len(rows))]
    table = laion_table(len(rows), urls=urls, captions=[r[0] for r in rows])
    pq.write_table(table, d / "part-0.parquet")
    return str(d)


@pytest.mark.usefixtures("spark")
def test_text_filter_writes_candidates_and_counts_rule_outcomes(tmp_path):
    out = str(tmp_path / "out")
    stats = run_text_filter(TextFilterConfig(), _yaml(tmp_path), _meta(tmp_path, ROWS), out)
    got = {r["caption"]: r for r in ds.dataset(out).to_table().to_pylist()}
    want = {c: (name, cands) for c, name, cands in ROWS if name}
    assert {c: (r["class_name"], r["candidates"]) for c, r in got.items()} == want
    assert got["Audi S5 for sale"]["matched_term"] == "Audi S5"
    assert got["Audi S5 for sale"]["label"] == 0  # the smallest candidate
    assert stats["rows_matched"] == 5 and stats["family_rows"] == 1
    assert stats["dropped"]["excluded"] == 1 and stats["dropped"]["contradicted"] == 2
    assert stats["per_class_excluded"] == {"rose": 1}
    assert stats["per_class_contradicted"] == {
        "Audi S5 Convertible 2012": 1,
        "Audi S5 Coupe 2012": 1,
        "Ford F-150 Regular Cab 2007": 1,
    }
    assert stats["per_class_family"] == {"Audi S5 Convertible 2012": 1, "Audi S5 Coupe 2012": 1}
    on_disk = json.loads((tmp_path / "out" / "_stats.json").read_text())
    assert on_disk["family_rows"] == 1 and on_disk["dropped"]["excluded"] == 1


@pytest.mark.usefixtures("spark")
def test_keep_ambiguous_entries_keep_their_family_candidates(tmp_path):
    rows = [("Audi S5 or a rose", None, None), ("a rose", "rose", [2])]
    out = str(tmp_path / "out")
    cfg = TextFilterConfig(keep_ambiguous=True)
    run_text_filter(cfg, _yaml(tmp_path), _meta(tmp_path, rows), out)
    t = ds.dataset(out).to_table().sort_by([("url", "ascending"), ("label", "ascending")])
    assert list(zip(t.column("label").to_pylist(), t.column("candidates").to_pylist())) == [
        (0, [0, 1]),
        (2, [2]),
        (2, [2]),
    ]


@pytest.mark.usefixtures("spark")
def test_a_changed_rule_rescans_and_the_same_rules_resume(tmp_path):
    """The scan's resume fingerprint holds every match rule: parts of a failed run are reused
    under the same rules, and rescanned when an exclusion list changes."""
    from pipeline.text_filter.scan import scan_file
    from pipeline.text_filter.stage import plan

    meta = _meta(tmp_path, ROWS)
    files = io.list_files(meta, suffixes=(".parquet",))
    old = _yaml(tmp_path)
    new = _yaml(tmp_path, CARS.replace("exclude: {rose: [rose gold]}", "exclude: {}"), "new.yaml")
    cfg = TextFilterConfig()
    clean = {}
    for name, y in (("old", old), ("new", new)):
        run_text_filter(cfg, y, meta, str(tmp_path / f"clean-{name}"))
        clean[name] = sorted(
            ds.dataset(str(tmp_path / f"clean-{name}")).to_table().column("caption").to_pylist()
        )
    assert "rose gold ring" in clean["new"] and "rose gold ring" not in clean["old"]

    def failed_run(out, fingerprint_of, scanned_with):
        io.makedirs(out)
        plan(cfg, load_dataset(fingerprint_of, descriptions=False), meta, out)
        rules = MatchRules.from_spec(load_dataset(scanned_with, descriptions=False))
        scan_file(0, files[0], out, cfg, rules)

    # Same rules: the failed run's part is reused as it is (here one scanned under other rules,
    # so reuse shows).
    out = str(tmp_path / "resumed")
    failed_run(out, old, new)
    run_text_filter(cfg, old, meta, out)
    assert sorted(ds.dataset(out).to_table().column("caption").to_pylist()) == clean["new"]
    # Changed exclusions: rescanned.
    out = str(tmp_path / "rescanned")
    failed_run(out, old, old)
    run_text_filter(cfg, new, meta, out)
    assert sorted(ds.dataset(out).to_table().column("caption").to_pylist()) == clean["new"]


# ---------------------------------------------------------------------- CLIP-score filter


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_choose_among_candidates_is_restricted_zero_shot():
    rng = np.random.default_rng(0)
    heads = _unit(rng.standard_normal((6, 8)))
    feats = _unit(rng.standard_normal((50, 8)))
    labels = rng.integers(0, 6, 50)
    cands = {i: sorted(rng.choice(6, 3, replace=False).tolist()) for i in range(0, 50, 2)}
    cands[48] = [7, 9]  # no candidate among the heads: the label stays
    got = choose_among_candidates(labels, feats, heads, cands)
    for i in range(50):
        if i in cands and i != 48:
            c = cands[i]
            assert got[i] == c[int(np.argmax(feats[i] @ heads[c].T))]
        else:
            assert got[i] == labels[i]
    t = clip_score_decision(
        np.array([f"u{i}" for i in range(50)], dtype=object),
        labels,
        feats,
        heads,
        SelectConfig(require_agreement=False),
        cands,
    )
    assert t.column("label").to_pylist() == got.tolist()
    assert t.column("pool_label").to_pylist() == labels.tolist()
    assert t.column("kept").to_pylist() == [True] * 50


def _write_pool(url, uids, labels, feats, cands):
    E.write_shard(
        url,
        "00000",
        uids,
        labels,
        feats,
        extra={"candidates": pa.array(cands, pa.list_(pa.int32()))},
    )
    io.write_json(io.join(url, E.META), {"embed_dim": feats.shape[1]})
    io.mark_done(url)


def _write_text(url, heads):
    write_text_embeddings(url, heads)


def test_a_decisions_labels_are_what_load_returns(tmp_path):
    """A family row relabelled by the CLIP filter reads back with its new label, through a
    decision of a decision too; a caption kept under two classes keeps both rows."""
    from pipeline.select.filters import run_transductive

    heads = _unit(np.eye(3, 8))
    feats = _unit(np.array([heads[1], heads[0], heads[2], heads[2]]) + 0.01)
    uids = ["fam", "one", "two", "two"]
    pool, text = str(tmp_path / "pool"), str(tmp_path / "text")
    _write_pool(pool, uids, [0, 0, 2, 1], feats, [[0, 1], None, [2], [1]])
    _write_text(text, heads)
    dec = str(tmp_path / "clip")
    stats = run_clip_filter(SelectConfig(), pool, text, dec)
    assert stats["family_rows"] == 1
    u, lab, _ = E.load(dec)
    assert sorted(zip(u.tolist(), lab.tolist())) == [("fam", 1), ("one", 0), ("two", 1), ("two", 2)]
    trans = str(tmp_path / "trans")
    run_transductive(SelectConfig(k=4), dec, pool, trans)
    u, lab, _ = E.load(trans)
    assert sorted(zip(u.tolist(), lab.tolist())) == [("fam", 1), ("one", 0), ("two", 1), ("two", 2)]


# ---------------------------------------------------------------------- end to end


@pytest.mark.usefixtures("spark")
def test_family_row_from_text_filter_to_clip_filter_decision(
    tmp_path, image_server, tiny_model_name
):
    from pipeline.download.stage import DownloadConfig, run_download
    from pipeline.embed.config import EmbedConfig
    from pipeline.embed.pool import embed_shards

    rows = ROWS[:5]
    urls = [image_server.url(f"fmnist/train/{i}.jpg") for i in range(len(rows))]
    matches = str(tmp_path / "matches")
    run_text_filter(TextFilterConfig(), _yaml(tmp_path), _meta(tmp_path, rows, urls), matches)
    family_uid = io.make_uid(urls[0], rows[0][0])

    shards = str(tmp_path / "shards")
    fast = dict(processes=1, threads=4, timeout=5, retries=0, image_size=64, samples_per_shard=8)
    stats = run_download(DownloadConfig(**fast, allow_private_addresses=True), matches, shards)
    assert stats["success"] == 4
    manifest = io.read_parquet(io.join(shards, "manifest.parquet"))
    by_uid = dict(
        zip(manifest.column("uid").to_pylist(), manifest.column("candidates").to_pylist())
    )
    assert by_uid[family_uid] == [0, 1]
    import webdataset as wds

    jsons = [
        json.loads(s["json"])
        for tar in io.list_files(shards, suffixes=(".tar",))
        for s in wds.WebDataset(tar, shardshuffle=False, empty_check=False)
    ]
    assert {j["uid"]: j["candidates"] for j in jsons}[family_uid] == [0, 1]

    pool = str(tmp_path / "pool")
    cfg = EmbedConfig(
        model=tiny_model_name, pretrained="none", device="cpu", batch_size=4, workers=0
    )
    embed_shards(cfg, shards, pool)
    table, feats = E.load_table(pool)
    row = table.column("uid").to_pylist().index(family_uid)
    assert table.column("candidates")[row].as_py() == [0, 1]
    assert table.column("label")[row].as_py() == 0

    # Text heads that make the family image class 1, then class 0: the decision follows the
    # image among its candidates (class 3 lies nearer still, but is no candidate).
    f = _unit(feats[row].astype(np.float32))
    other = _unit(np.roll(f, 1))
    for pick in (1, 0):
        heads = np.stack([other, other, _unit(f + np.roll(f, 2)), f]).astype(np.float32)
        heads[pick] = _unit(0.9 * f + 0.1 * other)
        text, dec = str(tmp_path / f"text{pick}"), str(tmp_path / f"clip{pick}")
        _write_text(text, heads)
        stats = run_clip_filter(SelectConfig(require_agreement=False), pool, text, dec)
        assert stats["family_rows"] == 1
        t = E.read_decision(dec).to_pylist()
        d = {r["uid"]: r for r in t}
        assert (d[family_uid]["label"], d[family_uid]["pool_label"]) == (pick, 0)
        assert all(r["label"] == r["pool_label"] for u, r in d.items() if u != family_uid)
        u, lab, _ = E.load(dec)
        assert dict(zip(u.tolist(), lab.tolist()))[family_uid] == pick
