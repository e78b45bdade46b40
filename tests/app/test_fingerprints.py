"""Outputs that know what made them: every stage reuses an output only for the same inputs and
settings, refuses one made from others (naming what differs and --overwrite), and under
`primer subset` redoes that stage and every stage after it."""

from __future__ import annotations

import os
import shutil
import tarfile

import pytest
from PIL import Image

from pipeline.app.cli import main
from pipeline.app.registry import resolve
from pipeline.app.stages import STAGES
from pipeline.app.subset import STEPS, run_subset, step_call
from pipeline.core import embeddings as E
from pipeline.core import fingerprint, io
from pipeline.demo.run import demo_config, demo_overrides, run_demo
from tests.conftest import DEMO_ROWS

# Per stage: a setting that changes its result (and the key the refusal must name), and one
# that changes only how the work is done (the output is reused).
CHANGES = {
    "filter": ("filter.max_per_class=3", "config.max_per_class", "filter.task_rows=7"),
    "download": ("download.image_size=32", "config.image_size", "download.threads=3"),
    # The demo's weights are its checkpoint: other weights (untrained) change the result.
    "embed-pool": ("embed.checkpoint=", "model.checkpoint_sha256", "embed.batch_size=7"),
    "embed-task-train": ("embed.checkpoint=", "model.checkpoint_sha256", "embed.workers=0"),
    "embed-task-test": ("embed.checkpoint=", "model.checkpoint_sha256", "embed.workers=0"),
    "embed-text": ("embed.checkpoint=", "model.checkpoint_sha256", "embed.batch_size=7"),
    "clip-filter": ("select.min_prob=0.5", "config.min_prob", "select.batch=17"),
    "transductive": ("select.k=3", "config.k", "select.threads=1"),
    "materialise": ("materialise.format=imagefolder", "config.format", "spark.master=local[1]"),
    "evaluate": ("evaluate.seeds=1", "config.seeds", "spark.master=local[1]"),
    "attribute": ("attribute.max_per_class=5", "config.max_per_class", "spark.master=local[1]"),
}


def _argv(step, run: str) -> list[str]:
    """The `primer` command line of a subset step, from its registry declaration."""
    inputs = os.path.join(run, "inputs")
    config = demo_config(run, os.path.join(inputs, "laion"), os.path.join(inputs, "task"))
    call = step_call(step, config, run, False)
    argv = [step.stage]
    for opt in call.stage.options:
        kind, _, name = opt.to.partition(":")
        value = call.inputs.get(name) if kind == "input" else call.params.get(name)
        if opt.to == "out":
            argv += [opt.flags[0], call.out]
        elif kind in ("input", "param") and value is not None and opt.flags[0].startswith("-"):
            if opt.kwargs.get("action") == "store_true":
                argv += [opt.flags[0]] if value else []
            else:
                for item in value if isinstance(value, list) else [value]:
                    argv += [opt.flags[0], str(item)]
    for item in demo_overrides():
        argv += ["--set", item]
    return argv


@pytest.fixture
def run(demo_run, tmp_path):
    """A copy of the demo's run directory (moved: its outputs must still be recognised)."""
    dst = str(tmp_path / "moved-run")
    shutil.copytree(demo_run, dst, ignore=shutil.ignore_patterns("_LOCK"))
    return dst


@pytest.mark.parametrize("name", list(CHANGES))
def test_each_stage_reuses_refuses_and_overwrites(run, name, caplog):
    step = next(s for s in STEPS if s.name == name)
    argv = _argv(step, run)
    out = os.path.join(run, step.out)
    made = fingerprint.stored(out)["run"]
    marker = io.read_bytes(os.path.join(out, io.SUCCESS))
    changed, key, harmless = CHANGES[name]
    # The same inputs and settings, or settings that change only how work is done: reused.
    assert main(argv) == 0
    assert main([*argv, "--set", harmless]) == 0
    assert fingerprint.stored(out)["run"] == made
    assert io.read_bytes(os.path.join(out, io.SUCCESS)) == marker
    # A setting that changes the result: refused, naming it and the fix; nothing touched.
    caplog.clear()
    assert main([*argv, "--set", changed]) == 2
    assert key in caplog.text and "--overwrite" in caplog.text
    assert fingerprint.stored(out)["run"] == made
    if name in ("filter", "download", "embed-pool"):
        return  # their --overwrite runs are covered by the subset tests below
    assert main([*argv, "--set", changed, "--overwrite"]) == 0
    assert fingerprint.stored(out)["run"] != made and io.is_done(out)
    assert main([*argv, "--set", changed]) == 0  # now the same again: reused


def test_filter_on_an_output_of_another_dataset_is_refused(run, caplog):
    """The review's case: `primer filter --dataset Flowers102 --out X` on an X finished for
    FashionMNIST used to report the old matches."""
    step = next(s for s in STEPS if s.name == "filter")
    argv = _argv(step, run)
    argv[argv.index("--dataset") + 1] = "Flowers102"
    assert main(argv) == 2
    assert "dataset.classes" in caplog.text and "dataset.name" in caplog.text


def test_filter_with_other_match_rules_is_refused(run, tmp_path, caplog):
    """The dataset's match rules (here one more exclusion) change the matches: an output made
    under the old rules is not reused."""
    import yaml

    from pipeline.core.config import load_dataset

    spec = yaml.safe_load(open(load_dataset("FashionMNIST").path, encoding="utf-8"))
    spec["exclude"]["dress"] = [*spec["exclude"]["dress"], "dress designer"]
    edited = tmp_path / "FashionMNIST.yaml"
    edited.write_text(yaml.safe_dump(spec), encoding="utf-8")
    step = next(s for s in STEPS if s.name == "filter")
    argv = _argv(step, run)
    argv[argv.index("--dataset") + 1] = str(edited)
    assert main(argv) == 2
    assert "dataset.rules" in caplog.text and "dataset.classes" not in caplog.text


def test_embed_text_with_another_model_is_refused(run, caplog, tiny_model_name):
    step = next(s for s in STEPS if s.name == "embed-text")
    argv = [*_argv(step, run), "--set", "embed.model=RN50"]
    assert main(argv) == 2 and "model.model" in caplog.text


def test_an_upstream_change_reaches_the_stages_after_it(run, caplog):
    """Download redone (same settings, new output): embedding the new shards is refused on the
    old pool until it is redone; the pool's fingerprint names the shards it was made from."""
    dl = next(s for s in STEPS if s.name == "download")
    pool = next(s for s in STEPS if s.name == "embed-pool")
    assert main([*_argv(dl, run), "--overwrite"]) == 0
    assert main(_argv(pool, run)) == 2
    assert "inputs.shards" in caplog.text


def test_subset_redoes_a_changed_stage_and_everything_after_it(run):
    inputs = os.path.join(run, "inputs")
    config = demo_config(
        run, os.path.join(inputs, "laion"), os.path.join(inputs, "task"), ["select.k=3"]
    )
    results = {r.name: r for r in run_subset(config)}
    before = ("filter", "download", "embed-pool", "embed-task-train", "embed-text", "clip-filter")
    assert all(results[n].status == "skipped" for n in before)
    assert results["transductive"].status == "redone"
    assert results["materialise"].status == "redone" and results["evaluate"].status == "redone"
    assert results["report"].status == "ran"
    assert io.read_json(os.path.join(run, "decisions/transductive/stats.json"))["k"] == 3
    assert io.read_json(os.path.join(run, "config.json"))["select"]["k"] == 3
    # And back: k=8 (the demo's) differs from what is there now, so it is redone again.
    config = demo_config(run, os.path.join(inputs, "laion"), os.path.join(inputs, "task"))
    again = {r.name: r.status for r in run_subset(config)}
    assert again["transductive"] == "redone" and again["embed-pool"] == "skipped"


def test_each_sections_setting_reaches_its_stage_under_subset(run, port):
    """`primer subset --set section.key=...` reaches the stage that reads it, and config.json
    records the values the stages used (the old subset overrode several of them)."""
    sets = [
        "filter.max_per_class=30",
        "download.image_size=48",
        "embed.checkpoint=",  # untrained weights, which embed.seed initialises
        "embed.seed=3",
        "select.k=3",
        "select.min_prob=0.05",
        "materialise.format=imagefolder",
        "evaluate.seeds=1",
        "evaluate.shots=[0, 2]",
    ]
    assert run_demo(run, port=port, rows=DEMO_ROWS, extra_overrides=sets) == 0
    assert fingerprint.stored(os.path.join(run, "matches"))["config"]["max_per_class"] == 30
    per_class = io.read_json(os.path.join(run, "matches", "_stats.json"))["per_class"]
    assert max(per_class.values()) == 30
    assert io.read_json(os.path.join(run, "shards", "config.json"))["image_size"] == 48
    sizes = set()
    for name in sorted(os.listdir(os.path.join(run, "shards"))):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(run, "shards", name)) as tf:
                for m in tf.getmembers():
                    if m.name.endswith(".jpg"):
                        sizes.add(min(Image.open(tf.extractfile(m)).size))
    assert sizes == {48}
    for emb in ("emb/pool", "emb/task-train", "emb/task-test", "emb/text"):
        assert E.read_meta(os.path.join(run, emb))["seed"] == 3
    assert E.read_meta(os.path.join(run, "decisions/clip"))["config"]["min_prob"] == 0.05
    assert io.read_json(os.path.join(run, "decisions/transductive/stats.json"))["k"] == 3
    assert io.read_json(os.path.join(run, "subset", "stats.json"))["format"] == "imagefolder"
    records = io.read_json(os.path.join(run, "eval", "results.json"))["records"]
    assert {r["shots"] for r in records} == {0, 2} and {r["seed"] for r in records} == {0}
    recorded = io.read_json(os.path.join(run, "config.json"))
    assert recorded["select"]["k"] == 3 and recorded["embed"]["seed"] == 3
    assert recorded["evaluate"]["shots"] == [0, 2]


def test_a_moved_run_directory_reads_its_own_outputs(run, demo_run, tmp_path):
    """Decisions name their pool relative to themselves: a moved run finds its own pool, from
    any working directory, and never a pool a relative path would name from the cwd."""
    meta = E.read_meta(os.path.join(run, "decisions", "transductive"))
    assert not os.path.isabs(meta["pool"])
    elsewhere = tmp_path / "cwd"
    (elsewhere / "emb" / "pool").mkdir(parents=True)  # a decoy the cwd would resolve to
    cwd = os.getcwd()
    try:
        os.chdir(elsewhere)
        uids, _, _ = E.load(os.path.join(run, "decisions", "transductive"))
    finally:
        os.chdir(cwd)
    want, _, _ = E.load(os.path.join(demo_run, "decisions", "transductive"))
    assert list(uids) == list(want) and len(uids)
    results = {r.name: r.status for r in run_subset(_moved_config(run))}
    assert set(results.values()) == {"skipped"}


def _moved_config(run):
    inputs = os.path.join(run, "inputs")
    return demo_config(run, os.path.join(inputs, "laion"), os.path.join(inputs, "task"))


def test_prepare_rules(tmp_path):
    out = str(tmp_path / "o")
    a = fingerprint.make("s", 1, {"k": 1}, {"x": {"files": 1}})
    b = fingerprint.make("s", 1, {"k": 2}, {"x": {"files": 2}})
    assert fingerprint.prepare(out, a)  # fresh: run
    io.write_bytes(os.path.join(out, "part"), b"1")
    assert fingerprint.prepare(out, a) and os.path.exists(os.path.join(out, "part"))  # resume
    assert fingerprint.prepare(out, b)  # unfinished of another: cleared
    assert not os.path.exists(os.path.join(out, "part"))
    io.mark_done(out)
    assert not fingerprint.prepare(out, b)  # complete, same: reused
    with pytest.raises(fingerprint.StaleOutputError, match=r"config\.k, inputs\.x"):
        fingerprint.prepare(out, a)
    assert fingerprint.prepare(out, a, overwrite=True) and not io.is_done(out)
    old = str(tmp_path / "old")
    io.mark_done(old)  # complete, made before fingerprints
    with pytest.raises(fingerprint.StaleOutputError, match="no fingerprint"):
        fingerprint.prepare(old, a)


def test_file_identity_ignores_where_files_live_but_not_what_they_are(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "sub").mkdir(parents=True)
    (a / "sub" / "x.parquet").write_bytes(b"123")
    (a / "_SUCCESS").write_bytes(b"")
    shutil.copytree(a, b)  # copy2 keeps mtimes
    ia, ib = fingerprint.file_identity(str(a)), fingerprint.file_identity(str(b))
    assert ia == ib and ia["files"] == 1
    (b / "sub" / "x.parquet").write_bytes(b"1234")
    assert fingerprint.file_identity(str(b)) != ia
    assert fingerprint.file_identity(str(tmp_path / "none")) == {"missing": str(tmp_path / "none")}


def test_a_command_that_fails_before_writing_leaves_no_directory(tmp_path, caplog):
    out = tmp_path / "never"
    argv = ["clip-filter", "--pool", str(tmp_path / "nope"), "--text", str(tmp_path / "nope2")]
    assert main([*argv, "--out", str(out)]) == 2
    assert not out.exists()
    assert STAGES["clip-filter"].section == "select"


def test_text_embeddings_given_as_a_pool_name_the_fix(run, caplog):
    argv = [
        "clip-filter",
        "--pool",
        os.path.join(run, "emb", "text"),
        "--text",
        os.path.join(run, "emb", "text"),
        "--out",
        os.path.join(run, "x"),
    ]
    assert main(argv) == 2
    assert "class prompt embeddings" in caplog.text and "embed-pool" in caplog.text
    assert not os.path.exists(os.path.join(run, "x"))


def test_metadata_given_as_csv_names_the_fix(tmp_path, caplog):
    csv = tmp_path / "laion.csv"
    csv.write_text("url,caption\nhttp://127.0.0.1/x.jpg,a shirt\n")
    argv = ["filter", "--dataset", "FashionMNIST", "--metadata", str(csv)]
    assert main([*argv, "--out", str(tmp_path / "m")]) == 2
    assert "parquet" in caplog.text and "pyarrow" in caplog.text
    assert not (tmp_path / "m").exists()
    assert resolve(None, [])["filter"].engine == "auto"
