"""The evaluation stage (issues 7 and 18): protocols, metrics, leak removal, label spaces, the
table and the CLI end to end."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pyarrow as pa
import pytest

from pipeline.app.cli import main
from pipeline.app.registry import resolve
from pipeline.core import embeddings as E
from pipeline.core import io
from pipeline.core.config import ConfigError, build, load_config, load_dataset
from pipeline.evaluate import metrics as M
from pipeline.evaluate.labels import apply_map, label_map
from pipeline.evaluate.protocols import Priming, shot_draws
from pipeline.evaluate.reference import IMAGENET_TEMPLATES as REFERENCE_TEMPLATES
from pipeline.evaluate.stage import (
    EvaluateConfig,
    Task,
    evaluate_task,
    load_task,
    priming_sources,
)
from pipeline.evaluate.table import render_table
from pipeline.select.neardup import near_duplicate_pairs
from tests.evaluate.test_classify import clusters, unit


def priming(protocol, pf, py):
    return Priming(protocol, pf, py, pf, py, np.ones(len(py), bool))


def synthetic_task(seed=0, cupl=False, transductive=False):
    T, (tf, ty), (xf, xy), (pf, py) = clusters(seed)
    # A "description" head nearer the truth than the templates, as CuPL hopes to be.
    cupl_head = unit(T + unit(tf[np.argsort(ty)][::20][:10])).astype(np.float32) if cupl else None
    primings = [priming("zero-shot priming", pf, py)]
    if transductive:
        near = np.unique(np.argsort(-(xf @ pf.T), axis=1)[:, :3])
        primings.append(priming("transductive priming", pf[near], py[near]))
    return Task(tf, ty, xf, xy, T, cupl_head, 10, primings, "synthetic")


def by_key(records):
    return {(r["method"], r["shots"], r["seed"]): r for r in records}


def test_rows_are_labelled_by_protocol_and_say_whether_test_images_were_used():
    task = synthetic_task(0, cupl=True, transductive=True)
    cfg = EvaluateConfig(shots=(0, 2), seeds=2)
    recs = evaluate_task(task, cfg)
    assert list(dict.fromkeys((r["protocol"], r["method"]) for r in recs)) == [
        ("zero-shot", "zero-shot CLIP"), ("zero-shot", "CuPL"),
        ("zero-shot priming", "priming"), ("zero-shot priming", "priming + CuPL"),
        ("transductive priming", "transductive priming"),
        ("transductive priming", "transductive priming + CuPL"),
        ("few-shot", "few-shot"), ("few-shot", "few-shot + priming"),
        ("few-shot", "few-shot + transductive priming"),
    ]  # fmt: skip
    by = by_key(recs)
    assert by[("priming", 0, 0)]["accuracy"] > by[("zero-shot CLIP", 0, 0)]["accuracy"] + 0.2
    assert by[("priming", 0, 0)]["alpha_rule"] == "pool+knn-train"
    assert by[("priming", 0, 0)]["test_images"] == "no"
    assert by[("priming", 0, 0)]["target_images"] == "train, unlabelled (alpha)"
    tr = by[("transductive priming", 0, 0)]
    assert tr["alpha_rule"] == "pool+knn-test" and tr["test_images"] == "unlabelled"
    assert by[("few-shot + transductive priming", 2, 1)]["test_images"] == "unlabelled"
    fp = by[("few-shot + priming", 2, 1)]
    assert (fp["n_shots"], fp["n_priming"], fp["n_test"], fp["alpha_rule"], fp["test_images"]) == (
        20, 600, 1000, "cv-shots", "no",
    )  # fmt: skip
    assert by[("few-shot", 2, 0)]["n_priming"] == 0
    for r in recs:  # balanced test classes: mean per-class accuracy is close to top-1
        assert abs(r["mean_per_class"] - r["accuracy"]) < 0.05
    assert recs == evaluate_task(task, cfg)  # seeded


def test_fixed_alpha_and_no_priming():
    task = synthetic_task(1)
    task.primings = []
    recs = evaluate_task(task, EvaluateConfig(shots=(1,), seeds=1, alpha="0.7"))
    assert [(r["method"], r["alpha"], r["alpha_rule"]) for r in recs] == [
        ("zero-shot CLIP", 1.0, "fixed"),
        ("few-shot", 0.7, "fixed"),
    ]


def test_empty_priming_set_leaves_its_rows_out():
    task = synthetic_task(1)
    p = task.primings[0]
    task.primings = [priming("zero-shot priming", p.feats[:0], p.labels[:0])]
    recs = evaluate_task(task, EvaluateConfig(shots=(0, 1), seeds=1))
    assert [r["method"] for r in recs] == ["zero-shot CLIP", "few-shot"]


def test_tip_adapter_head_uses_the_cache():
    task = synthetic_task(2)
    recs = evaluate_task(task, EvaluateConfig(shots=(0, 1, 3), seeds=1, head="tip-adapter"))
    by = by_key(recs)
    assert by[("priming", 0, 0)]["accuracy"] > by[("zero-shot CLIP", 0, 0)]["accuracy"]
    assert by[("priming", 0, 0)]["alpha_rule"] == "pool"
    assert by[("few-shot", 1, 0)]["alpha_rule"] == "fallback"  # 1 shot: nothing to validate on
    assert by[("few-shot + priming", 1, 0)]["alpha_rule"] == "cv-shots"
    assert all(r["tip_b"] is not None for r in recs if r["head"] == "tip-adapter")


def test_shot_copies_in_the_pool_leave_the_head_of_their_draw_only():
    task = synthetic_task(4)
    p = task.primings[0]
    copy_of = shot_draws(task, (1,), 1)[0][2][
        :5
    ]  # pool rows 0..4 are copies of the first five shots
    p.feats[:5] = task.train_feats[copy_of]
    p.labels[:5] = task.train_labels[copy_of]
    p.shot_dups = (np.arange(5), copy_of)
    cfg = EvaluateConfig(shots=(1,), seeds=1, alpha="0.3")
    with_dups = by_key(evaluate_task(task, cfg))[("few-shot + priming", 1, 0)]
    p.feats, p.labels, p.shot_dups = p.feats[5:], p.labels[5:], (np.zeros(0, int),) * 2
    without = by_key(evaluate_task(task, cfg))[("few-shot + priming", 1, 0)]
    assert with_dups["accuracy"] == without["accuracy"]


def test_table_renders_intervals_per_class_accuracy_and_footnotes():
    recs = [
        {"protocol": "zero-shot", "method": "zero-shot CLIP", "shots": 0, "seed": 0, "accuracy": 0.5, "mean_per_class": 0.4, "alpha": 1.0, "alpha_rule": "fixed", "n_test": 100},
        {"protocol": "zero-shot priming", "method": "priming", "shots": 0, "seed": 0, "accuracy": 0.55, "alpha": 0.4, "alpha_rule": "pool", "n_test": 100},
        {"protocol": "few-shot", "method": "few-shot", "shots": 1, "seed": 0, "accuracy": 0.6, "alpha": 0.5, "alpha_rule": "cv-shots", "n_test": 100},
        {"protocol": "few-shot", "method": "few-shot", "shots": 1, "seed": 1, "accuracy": 0.7, "alpha": 0.7, "alpha_rule": "cv-shots", "n_test": 100},
        {"protocol": "few-shot", "method": "few-shot", "shots": 2, "seed": 0, "accuracy": 0.7, "tip_a": 1.0, "tip_b": 5.5, "alpha_rule": "fallback", "n_test": 100, "test_images": "unlabelled"},
    ]  # fmt: skip
    md = render_table(recs, "Cars", ["note"])
    lo, hi = M.wilson(0.5, 100)
    assert md.startswith("# Cars\n")
    assert (
        f"| zero-shot | zero-shot CLIP | 0 | 50.00 | {100 * lo:.2f} - {100 * hi:.2f} | 40.00 | 1.00 | no | 1 |"
        in md
    )
    lo, hi, kind = M.interval([0.6, 0.7], 100)
    assert kind == "seeds" and (lo, hi) == (max(0, M.t_interval([0.6, 0.7])[0]), 1.0)
    assert (
        f"| few-shot | few-shot | 1 | 65.00 | {100 * lo:.2f} - {100 * hi:.2f} | - | 0.60⁶ | no | 2 |"
        in md
    )
    assert "| few-shot | few-shot | 2 | 70.00 |" in md and "a=1.00 b=5.5⁷ | unlabelled | 1 |" in md
    assert "¹ chosen against caption labels over the pool before the CLIP filter" in md
    assert md.rstrip().endswith("note")


def test_metrics_against_direct_formulas():
    pred = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    y = np.array([0, 1, 1, 1, 1, 2, 2, 2, 2, 0])
    assert M.top1(pred, y) == 0.8
    assert M.mean_per_class(pred, y) == pytest.approx((1 / 2 + 3 / 4 + 4 / 4) / 3)
    # Wilson: the roots in p of (p_hat - p)^2 = z^2 p (1 - p) / n.
    p_hat, n, z = 0.8, 10, M.Z95
    a, b, c = 1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat
    roots = sorted(np.roots([a, b, c]))
    np.testing.assert_allclose(M.wilson(p_hat, n), roots, atol=1e-9)
    assert M.wilson(1.0, 50)[1] == 1.0 and M.wilson(0.0, 50)[0] == pytest.approx(0.0, abs=1e-12)
    v = [0.61, 0.64, 0.58]
    half = 4.303 * np.std(v, ddof=1) / math.sqrt(3)
    np.testing.assert_allclose(M.t_interval(v), (np.mean(v) - half, np.mean(v) + half))
    assert all(math.isnan(x) for x in M.t_interval([0.5]))
    assert M.interval([0.5], 100)[2] == "binomial" and M.interval([0.5, 0.6], 100)[2] == "seeds"


def test_config_validation_overrides_and_yaml_defaults():
    assert build(EvaluateConfig, load_config()["evaluate"], "evaluate") == EvaluateConfig()
    with pytest.raises(ValueError, match="alpha"):
        EvaluateConfig(alpha="1.5")
    with pytest.raises(ValueError, match="head"):
        EvaluateConfig(head="linear-probe")
    with pytest.raises(ValueError, match="protocol"):
        EvaluateConfig(protocol="paper")
    with pytest.raises(ValueError, match="neardup_threshold"):
        EvaluateConfig(neardup_threshold=1.5)
    cfg = resolve(None, ["evaluate.seeds=5"], {"evaluate.shots": "0,4"})["evaluate"]
    assert cfg == EvaluateConfig(shots=(0, 4), seeds=5)
    assert (
        resolve(None, ["evaluate.neardup_threshold=null"], {})["evaluate"].neardup_threshold is None
    )
    with pytest.raises(ConfigError, match="shots"):
        resolve(None, [], {"evaluate.shots": "-1"})
    assert list(priming_sources({"transductive priming": "b", "zero-shot priming": "a"})) == [
        "zero-shot priming", "transductive priming",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="unknown priming protocol"):
        priming_sources({"paper priming": "a"})
    with pytest.raises(ConfigError, match="two priming sources"):
        priming_sources(["a", "b"])  # two plain pools: both zero-shot priming


# ------------------------------------------------------------------ on-disk inputs


def _write_embeddings(url, feats, labels, prefix, uids=None):
    uids = uids if uids is not None else [f"{prefix}{i}" for i in range(len(labels))]
    E.write_shard(url, "00000", uids, labels, feats)
    io.write_json(io.join(url, E.META), {"embed_dim": feats.shape[1], "untrained": False})
    io.mark_done(url)


def _write_text(url, heads, classnames, cupl=None, dataset=None, templates=("a photo of a {}.",)):
    """One embedded prompt per (template, class) near the class's head, and a description per
    class of ``cupl`` (a [C, D] head) where given."""
    rng = np.random.default_rng(0)
    feats, labels, kinds, prompts = [], [], [], []
    for t in templates:
        feats.append(unit(heads + 0.05 * rng.standard_normal(heads.shape)))
        labels += list(range(len(classnames)))
        kinds += ["template"] * len(classnames)
        prompts += [t.replace("{}", c) for c in classnames]
    if cupl is not None:
        feats.append(cupl)
        labels += list(range(len(cupl)))
        kinds += ["description"] * len(cupl)
        prompts += [f"a description of {c}" for c in classnames[: len(cupl)]]
    feats = np.concatenate(feats).astype(np.float32)
    E.write_shard(url, "text", [f"t{i}" for i in range(len(labels))], labels, feats,
                  extra={"kind": kinds, "prompt": prompts})  # fmt: skip
    meta = {"num_classes": len(classnames), "classnames": list(classnames)}
    if dataset:
        meta["dataset"] = dataset
    io.write_json(io.join(url, E.META), meta)
    io.mark_done(url)


def _decision(url, pool, uids, labels, kept, meta):
    table = pa.table(
        {
            "uid": list(uids),
            "label": pa.array(labels, pa.int32()),
            "score": pa.array(np.ones(len(uids)), pa.float32()),
            "kept": pa.array(np.asarray(kept, bool)),
            "reason": ["kept" if k else "dropped" for k in kept],
        }
    )
    E.write_decision(url, table, {"pool": pool, **meta}, {})


@pytest.fixture
def embedding_dirs(tmp_path):
    """Task, text (templates + descriptions), pool, a CLIP decision (agreement) and a
    transductive decision over it, on disk."""
    task = synthetic_task(3, cupl=True)
    p = task.primings[0]
    d = {k: str(tmp_path / k) for k in ("train", "test", "text", "pool", "clip", "decision")}
    yaml = tmp_path / "ds.yaml"
    yaml.write_text("classes: [" + ", ".join(f"c{i}" for i in range(10)) + "]\n")
    d["dataset"] = str(yaml)
    _write_embeddings(d["train"], task.train_feats, task.train_labels, "tr")
    _write_embeddings(d["test"], task.test_feats, task.test_labels, "te")
    _write_embeddings(d["pool"], p.feats, p.labels, "p")
    names = [f"c{i}" for i in range(10)]
    _write_text(d["text"], task.text, names, task.cupl[:8], templates=("a photo of a {}.", "a {}."))
    uids = [f"p{i}" for i in range(600)]
    agree = np.argmax(p.feats @ task.text.T, axis=1) == p.labels
    _decision(d["clip"], d["pool"], uids, p.labels, agree, {"filter": "clip"})
    near = np.zeros(600, bool)
    near[np.argsort(-(task.test_feats @ p.feats.T), axis=1)[:, :2].ravel()] = True
    _decision(d["decision"], d["pool"], uids, p.labels, near & agree,
              {"filter": "transductive", "queries": d["test"], "config": {"mode": "global"}})  # fmt: skip
    d["agree"], d["near"] = agree, near
    return d


def _argv(d, out, *extra, priming=("decision",)):
    argv = ["evaluate", "--dataset", d["dataset"], "--task-train", d["train"], "--task-test",
            d["test"], "--text", d["text"], "--shots", "0,2", "--seeds", "2", "--out", out]  # fmt: skip
    for name in priming:
        argv += ["--priming", d[name]]
    return argv + list(extra)


def test_cli_end_to_end_two_protocols_cupl_rerun_and_overwrite(
    embedding_dirs, tmp_path, capsys, caplog
):
    d, out = embedding_dirs, str(tmp_path / "eval")
    assert main(_argv(d, out, priming=("clip", "decision"))) == 0
    printed = capsys.readouterr().out
    for row in ("| zero-shot | zero-shot CLIP | 0 |", "| zero-shot | CuPL | 0 |",
                "| zero-shot priming | priming | 0 |", "| zero-shot priming | priming + CuPL | 0 |",
                "| transductive priming | transductive priming | 0 |",
                "| transductive priming | transductive priming + CuPL | 0 |",
                "| few-shot | few-shot | 2 |", "| few-shot | few-shot + priming | 2 |",
                "| few-shot | few-shot + transductive priming | 2 |"):  # fmt: skip
        assert row in printed
    assert io.is_done(out) and printed == open(f"{out}/results.md", encoding="utf-8").read()
    res = io.read_json(io.join(out, "results.json"))
    zs, tr = res["priming"]["zero-shot priming"], res["priming"]["transductive priming"]
    assert zs["priming_images"] == int(d["agree"].sum())
    assert tr["priming_images"] == int((d["agree"] & d["near"]).sum())
    assert zs["near_duplicates_of_test"]["total"] == 0
    assert len(res["records"]) == 6 + 3 * 2  # 6 rows without shots; 3 methods x 2 seeds at 2
    by = by_key(res["records"])
    assert by[("priming", 0, 0)]["accuracy"] > by[("zero-shot CLIP", 0, 0)]["accuracy"]
    assert by[("transductive priming", 0, 0)]["test_images"] == "unlabelled"
    assert io.read_json(io.join(out, "config.json"))["priming"] == {
        "zero-shot priming": d["clip"],
        "transductive priming": d["decision"],
    }
    before = open(f"{out}/results.json").read()
    both = ("clip", "decision")
    assert main(_argv(d, out, priming=both)) == 0  # the same inputs and settings: reused
    assert open(f"{out}/results.json").read() == before
    # Other inputs or settings on a complete output: refused, naming what differs and the fix.
    assert main(_argv(d, out)) == 2
    assert "zero-shot priming" in caplog.text and "--overwrite" in caplog.text
    assert main(_argv(d, out, "--alpha", "0.7", priming=both)) == 2
    assert "config.alpha" in caplog.text and "--overwrite" in caplog.text
    assert open(f"{out}/results.json").read() == before
    assert main(_argv(d, out, "--alpha", "0.7", "--overwrite", priming=both)) == 0
    recs = io.read_json(io.join(out, "results.json"))["records"]
    assert {r["alpha"] for r in recs if r["protocol"] != "zero-shot"} == {0.7}
    # The plain pool (not a decision) is zero-shot priming.
    out2 = str(tmp_path / "eval2")
    assert main(_argv(d, out2, "--head", "tip-adapter", priming=("pool",))) == 0
    assert "| few-shot | few-shot + priming | 2 |" in capsys.readouterr().out


def test_planted_copies_of_test_images_and_shots_are_dropped_and_counted(embedding_dirs, tmp_path):
    d = dict(embedding_dirs)
    task = synthetic_task(3)
    rng = np.random.default_rng(5)
    test_rows = np.array([0, 1, 2, 500])  # three of class test_labels[...] and one more
    copies = unit(task.test_feats[test_rows] + 0.02 * rng.standard_normal((4, 32)))
    far = unit(rng.standard_normal((3, 32)))  # not copies of anything
    p = task.primings[0]
    feats = np.concatenate([p.feats, copies, copies[:1], far]).astype(np.float32)
    labels = np.concatenate([p.labels, task.test_labels[test_rows], [3], [0, 1, 2]])
    d["pool"] = str(tmp_path / "pool2")
    _write_embeddings(d["pool"], feats, labels, "p")
    pairs = near_duplicate_pairs(feats, task.test_feats, 0.95)
    brute = np.argwhere((feats @ task.test_feats.T) >= 0.95)
    assert sorted(zip(*pairs)) == sorted(map(tuple, brute))
    out = str(tmp_path / "e")
    assert main(_argv(d, out, priming=("pool",))) == 0
    res = io.read_json(io.join(out, "results.json"))
    dup = res["priming"]["zero-shot priming"]["near_duplicates_of_test"]
    assert dup["total"] == 5 and dup["threshold"] == 0.95
    want = {}
    for y in list(task.test_labels[test_rows]) + [3]:
        want[f"c{y}"] = want.get(f"c{y}", 0) + 1
    assert dup["per_class"] == want
    assert res["priming"]["zero-shot priming"]["priming_images"] == 600 + 3
    assert "5 dropped as copies of test images" in open(f"{out}/results.md").read()
    shots = res["priming"]["zero-shot priming"]["near_duplicates_of_shots"]
    assert shots["images"] == 0


def test_a_copy_of_a_test_image_with_its_label_would_leak(tmp_path):
    """Why copies go: one pool image per test image, a copy with the test label, makes a
    transductive head look perfect; after removal the head is the honest one."""
    T, _, (xf, xy), (pf, py) = clusters(11, text_noise=8.0)
    pool = np.concatenate([pf, xf]).astype(np.float32)
    labels = np.concatenate([py, xy])
    pairs, _ = near_duplicate_pairs(pool, xf, 0.95)
    assert set(pairs.tolist()) >= set(range(len(pf), len(pool)))
    keep = np.setdiff1d(np.arange(len(pool)), pairs)
    from pipeline.evaluate.classify import accuracy, priming_weights

    leaked = accuracy(xf, xy, priming_weights(T, pool, labels, 0.0))
    honest = accuracy(xf, xy, priming_weights(T, pool[keep], labels[keep], 0.0))
    assert leaked > honest + 0.02


def test_near_duplicates_find_every_copy_beyond_k(tmp_path):
    rng = np.random.default_rng(1)
    targets = unit(rng.standard_normal((5, 16))).astype(np.float32)
    pool = unit(rng.standard_normal((200, 16)))
    pool[:40] = unit(targets[0] + 0.01 * rng.standard_normal((40, 16)))  # 40 copies of one
    pool[40] = targets[3]
    pi, ti = near_duplicate_pairs(pool.astype(np.float16), targets, 0.95, k=4)
    brute = np.argwhere(pool.astype(np.float16).astype(np.float32) @ targets.T >= 0.95)
    assert sorted(zip(pi.tolist(), ti.tolist())) == sorted(map(tuple, brute.tolist()))
    assert len(pi) == 41


def test_ambiguous_captions_are_dropped_and_counted(embedding_dirs, tmp_path):
    d = dict(embedding_dirs)
    task = synthetic_task(3)
    p = task.primings[0]
    uids = [f"p{i}" for i in range(600)] + ["p0", "p1"]  # p0, p1 also under another class
    feats = np.concatenate([p.feats, p.feats[:2]])
    labels = np.concatenate([p.labels, (p.labels[:2] + 1) % 10])
    d["pool"] = str(tmp_path / "pool3")
    _write_embeddings(d["pool"], feats, labels, "p", uids)
    out = str(tmp_path / "e")
    assert main(_argv(d, out, priming=("pool",))) == 0
    stats = io.read_json(io.join(out, "results.json"))["priming"]["zero-shot priming"]
    assert stats["ambiguous_dropped"] == 4 and stats["priming_images"] == 598


def test_cli_refuses_train_test_leakage(embedding_dirs, tmp_path, caplog):
    d = dict(embedding_dirs)
    test = E.load(d["test"])
    d["train"] = str(tmp_path / "leaky")
    _write_embeddings(d["train"], test[2][:5], test[1][:5], "te")  # test images inside train
    out = str(tmp_path / "e")
    with caplog.at_level(logging.ERROR):
        assert main(_argv(d, out, priming=())) == 2
    assert "leakage: 5 images appear in both" in caplog.text and not io.is_done(out)


def test_cli_refuses_a_transductive_decision_that_used_test_labels(
    embedding_dirs, tmp_path, caplog
):
    d = dict(embedding_dirs)
    p = synthetic_task(3).primings[0]
    d["kshot"] = str(tmp_path / "kshot")
    _decision(d["kshot"], d["pool"], [f"p{i}" for i in range(600)], p.labels, d["near"],
              {"filter": "transductive", "queries": d["test"], "config": {"mode": "kshot"}})  # fmt: skip
    with caplog.at_level(logging.ERROR):
        assert main(_argv(d, str(tmp_path / "e"), priming=("kshot",))) == 2
    assert "kshot" in caplog.text and "test labels" in caplog.text
    # Over the train split's images the same selection is fair, and uses no test image.
    d["train_q"] = str(tmp_path / "trainq")
    _decision(d["train_q"], d["pool"], [f"p{i}" for i in range(600)], p.labels, d["near"],
              {"filter": "transductive", "queries": d["train"], "config": {"mode": "kshot"}})  # fmt: skip
    out = str(tmp_path / "e2")
    assert main(_argv(d, out, priming=("train_q",))) == 0
    recs = io.read_json(io.join(out, "results.json"))["records"]
    assert {r["test_images"] for r in recs} == {"no"}


def test_cli_rejects_mismatched_inputs(embedding_dirs, tmp_path, caplog):
    d = dict(embedding_dirs)
    d["dataset"] = str(tmp_path / "nine.yaml")
    (tmp_path / "nine.yaml").write_text("classes: [" + ", ".join(f"c{i}" for i in range(9)) + "]\n")
    with caplog.at_level(logging.ERROR):
        assert main(_argv(d, str(tmp_path / "e"))) == 2
    assert "has 10 classes but" in caplog.text


# ------------------------------------------------------- ImageNet-R/-A label spaces


def test_label_map_between_imagenet_and_its_200_class_subsets():
    inet = load_dataset("ImageNet", descriptions=False)
    r = load_dataset("ImageNet-R", descriptions=False)
    a = load_dataset("ImageNet-A", descriptions=False)
    to_r = label_map(inet, r)
    assert (to_r >= 0).sum() == 200
    for j, i in enumerate(r.imagenet_indices):
        assert to_r[i] == j and inet.classes[i] == r.classes[j]
    assert (label_map(r, inet) == np.asarray(r.imagenet_indices)).all()
    r_to_a = label_map(r, a)
    shared = set(r.imagenet_indices) & set(a.imagenet_indices)
    assert (r_to_a >= 0).sum() == len(shared)
    assert apply_map(np.array([-1, 0, 5000]), to_r).tolist() == [-1, to_r[0], -1]
    with pytest.raises(ConfigError, match="no label mapping"):
        label_map(inet, load_dataset("Flowers102", descriptions=False))


def _imagenet_world(tmp_path):
    """Class k of ImageNet's 1000 sits at a random direction; text for all 1000 classes."""
    rng = np.random.default_rng(2)
    inet = load_dataset("ImageNet", descriptions=False)
    centers = unit(rng.standard_normal((1000, 24))).astype(np.float32)
    text = unit(centers + 1.2 * rng.standard_normal((1000, 24)) / np.sqrt(24)).astype(np.float32)
    d = {"text": str(tmp_path / "text")}
    templates = ("a photo of a {}.", *REFERENCE_TEMPLATES)
    _write_text(d["text"], text, list(inet.classes), dataset="ImageNet", templates=templates)
    return centers, text, d


def test_imagenet_pool_and_text_serve_imagenet_r_through_the_mapping(tmp_path):
    r = load_dataset("ImageNet-R", descriptions=False)
    idx = np.asarray(r.imagenet_indices)
    centers, text, d = _imagenet_world(tmp_path)
    rng = np.random.default_rng(3)
    test_y = np.repeat(np.arange(0, 200, 20), 20)  # 10 of R's classes
    test_f = unit(centers[idx[test_y]] + 1.0 * rng.standard_normal((len(test_y), 24)) / np.sqrt(24))
    train_y = np.repeat(np.arange(0, 200, 20), 3)
    train_f = unit(
        centers[idx[train_y]] + 1.0 * rng.standard_normal((len(train_y), 24)) / np.sqrt(24)
    )
    # A pool labelled in ImageNet's 1000 classes: the test classes' images, plus images of
    # classes R does not have (dropped, never relabelled).
    outside = np.setdiff1d(np.arange(1000), idx)[:5]
    pool_y = np.concatenate([np.repeat(idx[np.arange(0, 200, 20)], 15), np.repeat(outside, 4)])
    pool_f = unit(centers[pool_y] + 1.0 * rng.standard_normal((len(pool_y), 24)) / np.sqrt(24))
    for k, f, y in (
        ("train", train_f, train_y),
        ("test", test_f, test_y),
        ("pool", pool_f, pool_y),
    ):
        d[k] = str(tmp_path / k)
        _write_embeddings(d[k], f.astype(np.float32), y, k)
    out = str(tmp_path / "e")
    argv = ["evaluate", "--dataset", "ImageNet-R", "--task-train", d["train"], "--task-test",
            d["test"], "--text", d["text"], "--priming", d["pool"], "--priming-dataset", "ImageNet",
            "--shots", "0", "--out", out]  # fmt: skip
    assert main(argv) == 0
    res = io.read_json(io.join(out, "results.json"))
    stats = res["priming"]["zero-shot priming"]
    assert stats["outside_classes"] == 20 and stats["priming_images"] == 150
    assert res["num_classes"] == 200
    by = by_key(res["records"])
    zs = by[("zero-shot CLIP", 0, 0)]["accuracy"]
    heads = E.load_text(d["text"]).heads("template")
    want = np.mean(np.argmax(test_f @ heads[idx].T, axis=1) == test_y)  # the 200-way text head
    assert zs == pytest.approx(want, abs=1e-6)
    assert by[("priming", 0, 0)]["accuracy"] > zs + 0.1  # mapped images sit on their classes
    # Without --priming-dataset the 1000-class labels are not R's: refused, not mislabelled.
    with pytest.raises(io.InputError, match="priming-dataset"):
        load_task("ImageNet-R", d["train"], d["test"], d["text"], d["pool"])
    # The reference scored R 1000-way through a 1000-class text head: reproduced there.
    out = str(tmp_path / "ref")
    assert main(argv[:-1] + [out, "--protocol", "reference"]) == 0
    res = io.read_json(io.join(out, "results.json"))
    assert res["num_classes"] == 1000 and res["scored_classes"] == "ImageNet"
    te = E.load_text(d["text"])
    subset = np.isin(
        te.prompts, [t.replace("{}", c) for c in te.classnames for t in REFERENCE_TEMPLATES]
    )
    ref = np.zeros((1000, 24))
    np.add.at(ref, te.labels[subset], te.feats[subset].astype(np.float64))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    want = np.mean(np.argmax(test_f @ ref.T, axis=1) == idx[test_y])
    assert by_key(res["records"])[("zero-shot CLIP", 0, 0)]["accuracy"] == pytest.approx(want)


def test_imagenet_r_pool_serves_imagenet(tmp_path):
    inet = load_dataset("ImageNet", descriptions=False)
    r = load_dataset("ImageNet-R", descriptions=False)
    idx = np.asarray(r.imagenet_indices)
    centers, text, d = _imagenet_world(tmp_path)
    rng = np.random.default_rng(4)
    test_y = np.repeat(idx[:10], 20)  # ImageNet labels of R's first ten classes
    test_f = unit(centers[test_y] + 1.0 * rng.standard_normal((len(test_y), 24)) / np.sqrt(24))
    pool_y = np.repeat(np.arange(10), 15)  # R's labels 0..9
    pool_f = unit(centers[idx[pool_y]] + 1.0 * rng.standard_normal((len(pool_y), 24)) / np.sqrt(24))
    for k, f, y in (
        ("train", test_f[:0], test_y[:0]),
        ("test", test_f, test_y),
        ("pool", pool_f, pool_y),
    ):
        d[k] = str(tmp_path / k)
        _write_embeddings(d[k], f.astype(np.float32), y, k)
    task, info = load_task("ImageNet", d["train"], d["test"], d["text"], d["pool"],
                           priming_dataset="ImageNet-R")  # fmt: skip
    p = task.primings[0]
    assert task.num_classes == 1000 and inet.num_classes == 1000
    assert sorted(set(p.labels.tolist())) == sorted(idx[:10].tolist())
    assert (p.labels == idx[pool_y]).all()
    # A 200-class text head cannot serve the 1000-class task.
    d["text200"] = str(tmp_path / "text200")
    _write_text(d["text200"], text[idx], list(r.classes), dataset="ImageNet-R")
    with pytest.raises(io.InputError, match="lacks classes"):
        load_task("ImageNet", d["train"], d["test"], d["text200"], None)


def test_results_json_is_plain_json(embedding_dirs, tmp_path):
    out = str(tmp_path / "e")
    assert main(_argv(embedding_dirs, out, "--head", "tip-adapter")) == 0
    json.loads(open(f"{out}/results.json").read())  # no NaN or numpy types leak out
