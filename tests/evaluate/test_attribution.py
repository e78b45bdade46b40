"""``primer attribute``: rankings checked against brute-force refits (synthetic and on the demo
run), the harmful images' drop re-evaluated by the evaluate stage, test labels never read."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

from pipeline.app.cli import main
from pipeline.core import embeddings as E
from pipeline.core import io
from pipeline.evaluate import attribution as A
from pipeline.evaluate import classify as C
from tests.evaluate.test_influence import _brute


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def noisy_world(seed, c=6, d=24, per=10, noise=0.35, flip=0.3, n_lab=20, n_test=200):
    """Web-like priming: ``flip`` of the priming images carry another class's label."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(c, d)))
    text = _unit(centres + 0.7 * rng.normal(size=(c, d)))

    def draw(y):
        return _unit(centres[y] + noise * rng.normal(size=(len(y), d)))

    true = np.repeat(np.arange(c), per)
    p_f = draw(true)
    wrong = rng.random(len(true)) < flip
    p_y = np.where(wrong, (true + rng.integers(1, c, len(true))) % c, true)
    tr_y = np.repeat(np.arange(c), n_lab)
    te_y = np.repeat(np.arange(c), n_test)
    return dict(
        text=text,
        p_f=p_f,
        p_y=p_y,
        wrong=wrong,
        tr_f=draw(tr_y),
        tr_y=tr_y,
        te_f=draw(te_y),
        te_y=te_y,
    )


def test_dropping_the_harmful_images_helps_on_held_out_images():
    """With a third of the captions naming the wrong class, the images ranked harmful on the
    labelled train images are mostly the mislabelled ones, and dropping them raises accuracy
    on test images the ranking never saw."""
    gains, caught, dropped, base_rate = [], 0, 0, []
    for seed in range(12):
        w = noisy_world(seed)
        uids = np.array([f"p{i:03d}" for i in range(len(w["p_y"]))], object)
        res = A.attribute(
            w["text"],
            w["tr_f"],
            w["tr_y"],
            uids,
            w["p_f"],
            w["p_y"],
            A.AttributeConfig(),
            [f"c{i}" for i in range(6)],
        )
        a = res.summary["alpha"]
        bad = A.harmful_uids(res.images)
        keep = ~np.isin(uids, bad)
        te_f = w["te_f"].astype(np.float32)
        before = C.accuracy(te_f, w["te_y"], C.priming_weights(w["text"], w["p_f"], w["p_y"], a))
        after = C.accuracy(
            te_f, w["te_y"], C.priming_weights(w["text"], w["p_f"][keep], w["p_y"][keep], a)
        )
        gains.append(after - before)
        caught += int(w["wrong"][~keep].sum())
        dropped += int((~keep).sum())
        base_rate.append(w["wrong"].mean())
    assert np.mean(gains) > 0.01 and sum(g > 0 for g in gains) >= 8
    assert caught / dropped > np.mean(base_rate) + 0.15


def test_ranking_order_and_harmful_list():
    w = noisy_world(1)
    uids = np.array([f"p{i:03d}" for i in range(len(w["p_y"]))], object)
    res = A.attribute(
        w["text"],
        w["tr_f"],
        w["tr_y"],
        uids,
        w["p_f"],
        w["p_y"],
        A.AttributeConfig(alpha="0.3"),
        [f"c{i}" for i in range(6)],
    )
    t = res.images.to_pylist()
    assert [r["rank"] for r in t] == list(range(1, len(t) + 1))
    keys = [(-r["influence"], -r["margin_influence"], r["uid"]) for r in t]
    assert keys == sorted(keys)
    bad = A.harmful_uids(res.images)
    assert bad == [r["uid"] for r in reversed(t) if r["influence"] < 0]
    assert A.harmful_uids(res.images, max_drop=2) == bad[:2]
    assert res.summary["alpha"] == 0.3 and res.summary["alpha_rule"] == "fixed"
    assert res.summary["harmful"] == len(bad)
    with pytest.raises(ValueError, match="labelled must be train or shots"):
        A.AttributeConfig(labelled="test")
    with pytest.raises(ValueError, match="alpha"):
        A.AttributeConfig(alpha="1.2")


# ----------------------------------------------------------------- the stage, on disk


def _disk(d):
    """The world as the stage reads it back (float16 on disk), in float64."""
    w = dict(d["world"])
    _, _, p_f = E.load(d["pool"])
    _, _, tr_f = E.load(d["train"])
    w["p_f"], w["tr_f"] = _unit(p_f.astype(np.float64)), _unit(tr_f.astype(np.float64))
    w["text"] = E.load_text(d["text"]).heads("template").astype(np.float64)
    return w


def _write(url, uids, labels, feats, extra=None):
    E.write_shard(url, "00000", list(uids), labels, feats.astype(np.float32), extra=extra)
    io.write_json(io.join(url, E.META), {"embed_dim": feats.shape[1], "model": "m"})
    io.mark_done(url)


@pytest.fixture
def dirs(tmp_path):
    """A noisy world on disk: train, test, text, a pool of priming images, and matches whose
    terms are the class name, a misspelt variant for the mislabelled images, and one term
    two classes share."""
    w = noisy_world(4)
    c = 6
    d = {k: str(tmp_path / k) for k in ("train", "test", "text", "pool", "matches")}
    (tmp_path / "ds.yaml").write_text("classes: [" + ", ".join(f"c{i}" for i in range(c)) + "]\n")
    d["dataset"] = str(tmp_path / "ds.yaml")
    n = len(w["p_y"])
    d["uids"] = [f"p{i:03d}" for i in range(n)]
    _write(d["train"], [f"tr{i}" for i in range(len(w["tr_y"]))], w["tr_y"], w["tr_f"])
    _write(d["test"], [f"te{i}" for i in range(len(w["te_y"]))], w["te_y"], w["te_f"])
    _write(d["pool"], d["uids"], w["p_y"], w["p_f"])
    E.write_shard(
        d["text"],
        "text",
        [f"t{i}" for i in range(c)],
        np.arange(c),
        w["text"],
        extra={"kind": ["template"] * c, "prompt": [f"a c{i}" for i in range(c)]},
    )
    io.write_json(
        io.join(d["text"], E.META),
        {"num_classes": c, "model": "m", "classnames": [f"c{i}" for i in range(c)]},
    )
    io.mark_done(d["text"])
    terms = [f"c{y}-ish" if bad else f"c{y}" for y, bad in zip(w["p_y"], w["wrong"])]
    for i in range(n):
        if w["p_y"][i] in (0, 1) and i % 4 == 0:
            terms[i] = "shared"
    d["terms"] = terms
    matches = pa.table(
        {
            "uid": d["uids"],
            "label": pa.array(w["p_y"], pa.int32()),
            "caption": [f"a photo of {t} #{i}" for i, t in enumerate(terms)],
            "matched_term": terms,
        }
    )
    io.write_parquet(matches, io.join(d["matches"], "part-00000.parquet"))
    io.mark_done(d["matches"])
    d["world"] = w
    return d


def _argv(d, out, *extra, test=None):
    return [
        "attribute",
        "--dataset",
        d["dataset"],
        "--task-train",
        d["train"],
        "--text",
        d["text"],
        "--priming",
        d["pool"],
        "--matches",
        d["matches"],
        "--task-test",
        test or d["test"],
        "--out",
        out,
        "--set",
        "evaluate.shots=[0,2]",
        "--set",
        "evaluate.seeds=1",
        *extra,
    ]


def test_stage_ranks_images_terms_and_classes_exactly(dirs, tmp_path, capsys):
    out = str(tmp_path / "attr")
    assert main(_argv(dirs, out)) == 0
    printed = capsys.readouterr().out
    assert "60 priming images ranked on 120 labelled images" in printed
    w = _disk(dirs)
    images = io.read_parquet(io.join(out, "images.parquet")).to_pylist()
    terms = io.read_parquet(io.join(out, "terms.parquet")).to_pylist()
    classes = io.read_parquet(io.join(out, "classes.parquet")).to_pylist()
    ranking = io.read_json(io.join(out, "ranking.json"))
    alpha = ranking["summary"]["alpha"]
    assert sorted(r["uid"] for r in images) == dirs["uids"]
    # Every row against a refit without it (the whole train split is the labelled set).
    uid_index = {u: i for i, u in enumerate(dirs["uids"])}
    lx, ly = w["tr_f"], w["tr_y"]
    for r in images:
        keep = np.arange(len(w["p_y"])) != uid_index[r["uid"]]
        right, _ = _brute(w["text"], w["p_f"], w["p_y"], keep, alpha, lx, ly)
        assert r["correct_without"] == right, r["uid"]
        assert r["matched_term"] == dirs["terms"][uid_index[r["uid"]]]
        assert r["caption"].startswith("a photo of ")
    t_arr = np.asarray(dirs["terms"])
    assert {r["term"] for r in terms} == set(dirs["terms"])
    for r in terms:
        right, _ = _brute(w["text"], w["p_f"], w["p_y"], t_arr != r["term"], alpha, lx, ly)
        assert r["correct_without"] == right, r["term"]
    shared = next(r for r in terms if r["term"] == "shared")
    assert shared["classes"] == "c0, c1"
    for r in classes:
        right, _ = _brute(w["text"], w["p_f"], w["p_y"], w["p_y"] != r["label"], alpha, lx, ly)
        assert r["correct_without"] == right
    base, _ = _brute(w["text"], w["p_f"], w["p_y"], np.ones(len(w["p_y"]), bool), alpha, lx, ly)
    assert ranking["summary"]["base_accuracy"] == pytest.approx(base / len(ly))
    assert ranking["helpful"] == images[:24] and ranking["harmful"] == images[::-1][:24]
    assert ranking["terms"] == terms and io.is_done(out)
    assert not os.path.exists(os.path.join(out, "dropped"))


def test_drop_harmful_is_evaluated_by_the_evaluate_stage(dirs, tmp_path, capsys):
    from pipeline.evaluate.stage import EvaluateConfig, run_evaluate

    out = str(tmp_path / "attr")
    assert main(_argv(dirs, out, "--drop-harmful")) == 0
    printed = capsys.readouterr().out
    assert "priming, harmful images dropped | 0 shots |" in printed
    images = io.read_parquet(io.join(out, "images.parquet"))
    harmful = A.harmful_uids(images)
    assert harmful and io.read_json(io.join(out, "dropped.json"))["dropped"] == harmful
    # The dropped decision keeps exactly the priming images but the harmful ones ...
    kept_uids, _, _ = E.load(io.join(out, "dropped"))
    assert sorted(kept_uids) == sorted(set(dirs["uids"]) - set(harmful))
    # ... and its rows are what the evaluate stage gives that set, renamed.
    rows = io.read_json(io.join(out, "dropped.json"))["rows"]
    assert {r["method"] for r in rows} == {
        "priming, harmful images dropped",
        "few-shot + priming, harmful images dropped",
    }
    u, y, f = E.load(dirs["pool"])
    keep = ~np.isin(u, harmful)
    direct = str(tmp_path / "kept")
    _write(direct, u[keep], y[keep], f[keep].astype(np.float32))
    cfg = EvaluateConfig(shots=(0, 2), seeds=1)
    want = run_evaluate(
        cfg,
        dirs["dataset"],
        dirs["train"],
        dirs["test"],
        dirs["text"],
        str(tmp_path / "eval-kept"),
        direct,
    )
    want = {(r["method"], r["shots"], r["seed"]): r["accuracy"] for r in want["records"]}
    for r in rows:
        assert r["accuracy"] == want[(r["method"].replace(A.DROPPED, ""), r["shots"], r["seed"])]
    # A rerun reuses the output; another setting refuses until --overwrite.
    mtime = os.path.getmtime(os.path.join(out, "images.parquet"))
    assert main(_argv(dirs, out, "--drop-harmful")) == 0
    assert os.path.getmtime(os.path.join(out, "images.parquet")) == mtime
    assert main(_argv(dirs, out, "--drop-harmful", "--max-drop", "1")) == 2
    assert main(_argv(dirs, out, "--drop-harmful", "--max-drop", "1", "--overwrite")) == 0
    assert io.read_json(io.join(out, "dropped.json"))["dropped"] == harmful[:1]


def test_the_ranking_never_reads_test_labels(dirs, tmp_path):
    """Scrambled test labels change the re-evaluated rows, never the ranking."""
    scrambled = str(tmp_path / "test-scrambled")
    u, y, f = E.load(dirs["test"])
    _write(scrambled, u, np.random.default_rng(0).permutation(y), f.astype(np.float32))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(_argv(dirs, a, "--drop-harmful")) == 0
    assert main(_argv(dirs, b, "--drop-harmful", test=scrambled)) == 0
    for name in ("images", "terms", "classes"):
        ta = io.read_parquet(io.join(a, f"{name}.parquet"))
        assert ta.equals(io.read_parquet(io.join(b, f"{name}.parquet")))
    rows_a = io.read_json(io.join(a, "dropped.json"))["rows"]
    rows_b = io.read_json(io.join(b, "dropped.json"))["rows"]
    assert [r["accuracy"] for r in rows_a] != [r["accuracy"] for r in rows_b]


def test_shots_as_the_labelled_set(dirs, tmp_path):
    out = str(tmp_path / "attr")
    argv = _argv(dirs, out, "--labelled", "shots", "--set", "attribute.shots=3")
    assert main(argv) == 0
    ranking = io.read_json(io.join(out, "ranking.json"))
    assert ranking["summary"]["labelled"] == {"source": "shots", "n": 18, "split": "train"}
    w = _disk(dirs)
    idx = C.sample_shots(w["tr_y"], 3, 0, 6)  # the evaluation's draw for (seed 0, 3 shots)
    alpha = ranking["summary"]["alpha"]
    for r in io.read_parquet(io.join(out, "classes.parquet")).to_pylist():
        right, _ = _brute(
            w["text"],
            w["p_f"],
            w["p_y"],
            w["p_y"] != r["label"],
            alpha,
            w["tr_f"][idx],
            w["tr_y"][idx],
        )
        assert r["correct_without"] == right
    capped = str(tmp_path / "capped")
    assert main(_argv(dirs, capped, "--set", "attribute.max_per_class=5")) == 0
    summary = io.read_json(io.join(capped, "ranking.json"))["summary"]
    assert summary["labelled"] == {"source": "train", "n": 30, "split": "train"}


def test_missing_inputs_are_named(tmp_path, caplog):
    assert main(["attribute", "--out", str(tmp_path / "o")]) == 2
    assert "primer attribute needs dataset, train, text, priming" in caplog.text
    assert not (tmp_path / "o").exists()
    caplog.clear()
    (tmp_path / "empty").mkdir()
    assert main(["attribute", str(tmp_path / "empty")]) == 2
    assert "needs dataset, train, text, priming" in caplog.text


# ------------------------------------------------------------------- the demo run


def test_on_the_demo_run_against_brute_force(demo_run, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(demo_run, run)
    assert main(["attribute", run]) == 0
    out = os.path.join(run, A.OUT_DIR)
    ranking = io.read_json(os.path.join(out, "ranking.json"))
    s = ranking["summary"]
    # The run's inputs: the transductive decision (what the evaluation primed with) and the
    # whole train split as the labelled set.
    p_u, p_y, p_f = E.load(os.path.join(run, "decisions", "transductive"))
    _, tr_y, tr_f = E.load(os.path.join(run, "emb", "task-train"))
    text = E.load_text(os.path.join(run, "emb", "text")).heads("template").astype(np.float64)
    assert s["n_images"] == len(set(p_u)) and s["labelled"]["n"] == len(tr_y)
    p_f = _unit(p_f.astype(np.float64))
    lx = _unit(tr_f.astype(np.float64))
    alpha = s["alpha"]
    images = io.read_parquet(os.path.join(out, "images.parquet")).to_pylist()
    row = {u: i for i, u in enumerate(p_u)}
    for r in images:
        keep = np.arange(len(p_y)) != row[r["uid"]]
        assert r["correct_without"] == _brute(text, p_f, p_y, keep, alpha, lx, tr_y)[0]
    matches = io.read_parquet(os.path.join(run, "matches"), columns=["uid", "matched_term"])
    term_of = dict(
        zip(matches.column("uid").to_pylist(), matches.column("matched_term").to_pylist())
    )
    assert all(r["matched_term"] == term_of[r["uid"]] for r in images)
    p_terms = np.asarray([term_of[u] for u in p_u])
    for r in io.read_parquet(os.path.join(out, "terms.parquet")).to_pylist():
        keep = p_terms != r["term"]
        assert r["correct_without"] == _brute(text, p_f, p_y, keep, alpha, lx, tr_y)[0]
    for r in io.read_parquet(os.path.join(out, "classes.parquet")).to_pylist():
        keep = p_y != r["label"]
        assert r["correct_without"] == _brute(text, p_f, p_y, keep, alpha, lx, tr_y)[0]
    # Dropping re-evaluates with the run's own evaluate settings (its table's shots).
    capsys.readouterr()
    assert main(["attribute", run, "--drop-harmful", "--overwrite"]) == 0
    assert "transductive priming, harmful images dropped | 0 shots" in capsys.readouterr().out
    rows = io.read_json(os.path.join(out, "dropped.json"))["rows"]
    run_shots = io.read_json(os.path.join(run, "config.json"))["evaluate"]["shots"]
    assert {r["shots"] for r in rows} == set(run_shots)
