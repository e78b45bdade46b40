"""Issue 7: the evaluation stage: methods x shots x seeds, the table, the CLI end to end."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pytest

from pipeline.app.cli import main
from pipeline.app.registry import resolve
from pipeline.core import embeddings as E
from pipeline.core import io
from pipeline.core.config import ConfigError
from pipeline.evaluate.stage import EvaluateConfig, Task, evaluate_task, render_table
from tests.test_classify import clusters, unit


def synthetic_task(seed=0, cupl=False):
    T, (tf, ty), (xf, xy), (pf, py) = clusters(seed)
    # A "description" head nearer the truth than the templates, as CuPL hopes to be.
    cupl_head = unit(T + unit(tf[np.argsort(ty)][::20][:10])).astype(np.float32) if cupl else None
    return Task(tf, ty, xf, xy, T, cupl_head, pf, py, 10)


def by_key(records):
    return {(r["method"], r["shots"], r["seed"]): r for r in records}


def test_priming_beats_zero_shot_and_rows_carry_counts():
    task = synthetic_task(0, cupl=True)
    recs = evaluate_task(task, EvaluateConfig(shots=(0, 2), seeds=2))
    by = by_key(recs)
    assert list(dict.fromkeys(r["method"] for r in recs)) == [
        "zero-shot CLIP", "CuPL", "priming", "priming + CuPL", "few-shot", "few-shot + priming",
    ]  # fmt: skip
    assert by[("priming", 0, 0)]["accuracy"] > by[("zero-shot CLIP", 0, 0)]["accuracy"] + 0.2
    assert by[("priming", 0, 0)]["alpha_rule"] == "loo-priming"
    fp = by[("few-shot + priming", 2, 1)]
    assert (fp["n_shots"], fp["n_priming"], fp["n_test"], fp["alpha_rule"]) == (
        20,
        600,
        1000,
        "cv-shots",
    )
    assert by[("few-shot", 2, 0)]["n_priming"] == 0
    assert recs == evaluate_task(task, EvaluateConfig(shots=(0, 2), seeds=2))  # seeded


def test_fixed_alpha_and_no_priming():
    task = synthetic_task(1)
    task.priming_feats, task.priming_labels = task.priming_feats[:0], task.priming_labels[:0]
    recs = evaluate_task(task, EvaluateConfig(shots=(1,), seeds=1, alpha="0.7"))
    assert [(r["method"], r["alpha"], r["alpha_rule"]) for r in recs] == [
        ("zero-shot CLIP", 1.0, "fixed"),
        ("few-shot", 0.7, "fixed"),
    ]


def test_tip_adapter_head_uses_the_cache():
    task = synthetic_task(2)
    recs = evaluate_task(task, EvaluateConfig(shots=(0, 1, 3), seeds=1, head="tip-adapter"))
    by = by_key(recs)
    assert by[("priming", 0, 0)]["accuracy"] > by[("zero-shot CLIP", 0, 0)]["accuracy"]
    assert by[("few-shot", 1, 0)]["alpha_rule"] == "fallback"  # 1 shot: nothing to validate on
    assert by[("few-shot + priming", 1, 0)]["alpha_rule"] == "cv-shots"
    assert all(r["tip_b"] is not None for r in recs if r["head"] == "tip-adapter")


def test_table_renders_mean_std_and_footnotes():
    recs = [
        {"method": "zero-shot CLIP", "shots": 0, "seed": 0, "accuracy": 0.5, "alpha": 1.0, "alpha_rule": "fixed"},
        {"method": "priming", "shots": 0, "seed": 0, "accuracy": 0.55, "alpha": 0.4, "alpha_rule": "loo-priming"},
        {"method": "few-shot", "shots": 1, "seed": 0, "accuracy": 0.6, "alpha": 0.5, "alpha_rule": "cv-shots"},
        {"method": "few-shot", "shots": 1, "seed": 1, "accuracy": 0.7, "alpha": 0.7, "alpha_rule": "cv-shots"},
        {"method": "few-shot", "shots": 2, "seed": 0, "accuracy": 0.7, "tip_a": 1.0, "tip_b": 5.5, "alpha_rule": "fallback"},
    ]  # fmt: skip
    md = render_table(recs, "Cars", ["note"])
    assert md.startswith("# Cars\n")
    assert "| zero-shot CLIP | 0 | 50.00 | 1.00 | 1 |" in md
    assert "| priming | 0 | 55.00 | 0.40¹ | 1 |" in md
    assert "| few-shot | 1 | 65.00 ± 5.00 | 0.60² | 2 |" in md
    assert "| few-shot | 2 | 70.00 | a=1.00 b=5.5³ | 1 |" in md
    assert "¹ chosen by leave-one-out over the priming images" in md and md.rstrip().endswith(
        "note"
    )


def test_config_validation_and_overrides():
    with pytest.raises(ValueError, match="alpha"):
        EvaluateConfig(alpha="1.5")
    with pytest.raises(ValueError, match="head"):
        EvaluateConfig(head="linear-probe")
    cfg = resolve(None, ["evaluate.seeds=5"], {"evaluate.shots": "0,4"})["evaluate"]
    assert cfg == EvaluateConfig(shots=(0, 4), seeds=5)
    with pytest.raises(ConfigError, match="shots"):
        resolve(None, [], {"evaluate.shots": "-1"})


def _write_embeddings(url, feats, labels, prefix):
    E.write_shard(url, "00000", [f"{prefix}{i}" for i in range(len(labels))], labels, feats)
    io.write_json(io.join(url, E.META), {"embed_dim": feats.shape[1], "untrained": False})
    io.mark_done(url)


@pytest.fixture
def embedding_dirs(tmp_path):
    """Task, text (templates + descriptions), pool and a transductive decision on disk."""
    task = synthetic_task(3, cupl=True)
    d = {k: str(tmp_path / k) for k in ("train", "test", "text", "pool", "decision")}
    yaml = tmp_path / "ds.yaml"
    yaml.write_text("classes: [" + ", ".join(f"c{i}" for i in range(10)) + "]\n")
    d["dataset"] = str(yaml)
    _write_embeddings(d["train"], task.train_feats, task.train_labels, "tr")
    _write_embeddings(d["test"], task.test_feats, task.test_labels, "te")
    _write_embeddings(d["pool"], task.priming_feats, task.priming_labels, "p")
    # Two template prompts per class and one description for classes 0..7 (8, 9 fall back).
    rng = np.random.default_rng(0)
    tmpl = unit(np.repeat(task.text, 2, axis=0) + 0.05 * rng.standard_normal((20, 32)))
    feats = np.concatenate([tmpl, task.cupl[:8]])
    labels = list(np.repeat(np.arange(10), 2)) + list(range(8))
    kinds = ["template"] * 20 + ["description"] * 8
    E.write_shard(d["text"], "text", [f"t{i}" for i in range(28)], labels, feats, extra={"kind": kinds, "prompt": [f"p{i}" for i in range(28)]})  # fmt: skip
    io.write_json(io.join(d["text"], E.META), {"num_classes": 10, "classnames": [f"c{i}" for i in range(10)]})  # fmt: skip
    io.mark_done(d["text"])
    kept = np.arange(600) % 3 != 0
    table = pa.table(
        {
            "uid": [f"p{i}" for i in range(600)],
            "label": pa.array(task.priming_labels, pa.int32()),
            "score": pa.array(np.ones(600), pa.float32()),
            "kept": kept,
            "reason": ["knn" if k else "far" for k in kept],
        }
    )
    E.write_decision(d["decision"], table, {"pool": d["pool"], "filter": "transductive"}, {})
    return d


def _argv(d, out, *extra, priming="decision"):
    argv = [
        "evaluate",
        "--dataset",
        d["dataset"],
        "--task-train",
        d["train"],
        "--task-test",
        d["test"],
    ]
    argv += ["--text", d["text"], "--shots", "0,2", "--seeds", "2", "--out", out, *extra]
    return argv + (["--priming", d[priming]] if priming else [])


def test_cli_end_to_end_transductive_cupl_rerun_and_overwrite(
    embedding_dirs, tmp_path, capsys, caplog
):
    d, out = embedding_dirs, str(tmp_path / "eval")
    assert main(_argv(d, out)) == 0
    printed = capsys.readouterr().out
    for row in ("| zero-shot CLIP | 0 |", "| CuPL | 0 |", "| transductive priming | 0 |",
                "| transductive priming + CuPL | 0 |", "| few-shot | 2 |",
                "| few-shot + transductive priming | 2 |"):  # fmt: skip
        assert row in printed
    assert io.is_done(out) and printed == open(f"{out}/results.md", encoding="utf-8").read()
    res = io.read_json(io.join(out, "results.json"))
    assert res["n_priming"] == 400 and res["priming_method"] == "transductive priming"
    assert len(res["records"]) == 4 + 2 * 2  # 4 rows without shots; 2 methods x 2 seeds at 2 shots
    by = by_key(res["records"])
    assert by[("transductive priming", 0, 0)]["accuracy"] > by[("zero-shot CLIP", 0, 0)]["accuracy"]
    assert io.read_json(io.join(out, "config.json"))["shots"] == [0, 2]
    before = open(f"{out}/results.json").read()
    assert main(_argv(d, out)) == 0  # the same inputs and settings: reused
    assert open(f"{out}/results.json").read() == before
    # Other settings on a complete output: refused, naming what differs and the fix.
    assert main(_argv(d, out, "--alpha", "0.7")) == 2
    assert "config.alpha" in caplog.text and "--overwrite" in caplog.text
    assert open(f"{out}/results.json").read() == before
    assert main(_argv(d, out, "--alpha", "0.7", "--overwrite")) == 0
    recs = io.read_json(io.join(out, "results.json"))["records"]
    assert {
        r["alpha"] for r in recs if r["method"] != "zero-shot CLIP" and r["method"] != "CuPL"
    } == {0.7}
    # The plain pool (not a decision) gives rows named "priming".
    out2 = str(tmp_path / "eval2")
    assert main(_argv(d, out2, "--head", "tip-adapter", priming="pool")) == 0
    assert "| few-shot + priming | 2 |" in capsys.readouterr().out


def test_cli_refuses_train_test_leakage(embedding_dirs, tmp_path, caplog):
    d = dict(embedding_dirs)
    test = E.load(d["test"])
    d["train"] = str(tmp_path / "leaky")
    _write_embeddings(d["train"], test[2][:5], test[1][:5], "te")  # test images inside train
    out = str(tmp_path / "e")
    with caplog.at_level(logging.ERROR):
        assert main(_argv(d, out, priming=None)) == 2
    assert "leakage: 5 images appear in both" in caplog.text and not io.is_done(out)


def test_cli_rejects_mismatched_inputs(embedding_dirs, tmp_path, caplog):
    d = dict(embedding_dirs)
    d["dataset"] = str(tmp_path / "nine.yaml")
    (tmp_path / "nine.yaml").write_text("classes: [" + ", ".join(f"c{i}" for i in range(9)) + "]\n")
    with caplog.at_level(logging.ERROR):
        assert main(_argv(d, str(tmp_path / "e"))) == 2
    assert "has 10 classes but" in caplog.text
