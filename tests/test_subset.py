"""Issues 8 and 9: the whole pipeline through `primer demo` / `primer subset`, resume,
faults, locks, determinism, the notebook and the HTML report."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pipeline.app.registry import resolve
from pipeline.app.subset import STAGE_OUT, TEXT_ORDER, SourceError, run_subset
from pipeline.core import io
from pipeline.demo.run import demo_config, run_demo
from tests.conftest import DEMO_ROWS as ROWS

STAGES = TEXT_ORDER  # the demo's steps, in order


def _demo_config(run):
    """The config of a demo run directory, pointing at the inputs the demo wrote."""
    inputs = os.path.join(run, "inputs")
    return demo_config(run, os.path.join(inputs, "laion"), os.path.join(inputs, "task"))


def _config(**subset):
    """A resolved config with these subset settings and the tiny untrained model."""
    sets = [f"subset.{k}={v}" for k, v in subset.items() if not k.startswith("embed_")]
    sets += [f"embed.{k[6:]}={v}" for k, v in subset.items() if k.startswith("embed_")]
    model = ["embed.model=primer-tiny-vit", "embed.pretrained=none"]
    return resolve(None, model + sets)


def _bytes(run, stage, name):
    with open(os.path.join(run, STAGE_OUT[stage], name), "rb") as f:
        return f.read()


def test_demo_runs_every_stage(demo_run):
    for stage in STAGES:
        out = os.path.join(demo_run, STAGE_OUT[stage])
        assert os.path.exists(out), stage
        if stage != "report":
            assert io.is_done(out), stage
    stats = io.read_json(os.path.join(demo_run, "matches", "_stats.json"))
    assert stats["rows_scanned"] == ROWS and stats["rows_matched"] > 300
    sense = io.read_json(os.path.join(demo_run, "sense", "_stats.json"))
    assert sense["rows_in"] == stats["rows_matched"] > sense["rows_kept"] > 200
    shards = io.read_json(os.path.join(demo_run, "shards", "stats.json"))
    assert shards["total"] == sense["rows_kept"]
    assert shards["success"] > 200 and shards["failures_by_reason"]
    results = _bytes(demo_run, "evaluate", "results.md").decode()
    assert (
        "zero-shot CLIP" in results
        and "transductive priming" in results
        and "meaningless" not in results  # the shipped demo model is trained
    )
    assert os.path.exists(os.path.join(demo_run, "config.json"))


def test_rerun_skips_everything(demo_run, port, monkeypatch):
    from pipeline.app import adapters as stages

    calls = []
    for name in ("run_filter", "run_download", "run_embed_pool", "run_evaluate"):
        real = getattr(stages, name)
        monkeypatch.setattr(
            stages, name, lambda call, real=real: calls.append(call.stage.name) or real(call)
        )
    results = run_subset(_demo_config(demo_run))
    # Each stage was asked, found its output made from the same inputs and settings, and kept it.
    assert calls == ["filter", "download", "embed-pool", "evaluate"]
    assert {r.status for r in results} == {"skipped"}
    assert all(r.stats for r in results if r.name != "report")


def test_second_run_from_scratch_is_byte_identical(demo_run, port, tmp_path, spark):
    again = str(tmp_path / "again")
    assert run_demo(again, port=port, rows=ROWS) == 0
    for stage, name in (
        ("clip-filter", "decision.parquet"),
        ("transductive", "decision.parquet"),
        ("evaluate", "results.md"),
    ):
        assert _bytes(demo_run, stage, name) == _bytes(again, stage, name), (stage, name)
    # The same rows; source_file names each run's own copy of the inputs.
    a = io.read_parquet(os.path.join(demo_run, "matches")).sort_by("uid")
    b = io.read_parquet(os.path.join(again, "matches")).sort_by("uid")
    assert a.drop_columns(["source_file"]) == b.drop_columns(["source_file"])


def test_resume_after_interrupted_embed_stage(demo_run, port, tmp_path, spark):
    run = str(tmp_path / "resumed")
    shutil.copytree(demo_run, run)
    os.unlink(os.path.join(run, "_LOCK"))
    # As if killed inside the embed stage: one pool shard unfinished, later stages never ran.
    pool = os.path.join(run, "emb", "pool")
    done = sorted(n for n in os.listdir(pool) if n.endswith(".done"))
    os.unlink(os.path.join(pool, done[-1]))
    os.unlink(os.path.join(pool, "_SUCCESS"))
    for stage in STAGES[STAGES.index("clip-filter") :]:
        shutil.rmtree(os.path.join(run, STAGE_OUT[stage]))
    assert run_demo(run, port=port, rows=ROWS) == 0
    for stage, name in (("transductive", "decision.parquet"), ("evaluate", "results.md")):
        assert _bytes(demo_run, stage, name) == _bytes(run, stage, name)


def test_failed_stage_stops_the_run_and_keeps_earlier_outputs(demo_run, tmp_path, monkeypatch):
    run = str(tmp_path / "failing")
    shutil.copytree(demo_run, run)
    os.unlink(os.path.join(run, "_LOCK"))
    shutil.rmtree(os.path.join(run, "decisions"))
    from pipeline.app import adapters as stages

    def boom(call):
        raise io.InputError("no")

    monkeypatch.setattr(stages, "run_clip_filter", boom)
    with pytest.raises(RuntimeError, match="clip-filter"):
        run_subset(_demo_config(run))
    assert io.is_done(os.path.join(run, "emb", "pool")) and not os.path.exists(
        os.path.join(run, "decisions", "clip", "_SUCCESS")
    )


def test_unreachable_sources_stop_before_any_stage(tmp_path, caplog):
    from pipeline.app.cli import main

    run = str(tmp_path / "run")
    task = tmp_path / "task"
    task.mkdir()
    code = main(
        [
            "subset",
            "--dataset",
            "FashionMNIST",
            "--metadata",
            str(tmp_path / "no-such-laion"),
            "--data-root",
            str(task),
            "--run-dir",
            run,
            "--pretrained",
            "none",
            "--model",
            "primer-tiny-vit",
        ]
    )
    assert code == 1 and "LAION metadata" in caplog.text and "LAION=" in caplog.text
    assert not os.path.exists(run)
    where = {"dataset": "FashionMNIST", "metadata": str(tmp_path), "run_dir": run}
    cfg = _config(**where, data_root=str(tmp_path / "missing-task"))
    with pytest.raises(SourceError, match="DATA_ROOT"):
        run_subset(cfg, from_step="embed-task-train", to_step="embed-task-train")
    cfg = _config(**where, data_root=str(task), embed_checkpoint=str(tmp_path / "nope.pt"))
    with pytest.raises(SourceError, match="checkpoint"):
        run_subset(cfg, from_step="embed-pool", to_step="embed-pool")
    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = resolve(None, [f"subset.{k}={v}" for k, v in {**where, "data_root": task}.items()])
    with pytest.raises(SourceError, match="offline"):
        run_subset(cfg, from_step="embed-text", to_step="embed-text")
    cfg = _config(**{**where, "metadata": str(tmp_path / "laion.csv")}, data_root=str(task))
    with pytest.raises(SourceError, match="not parquet"):
        run_subset(cfg)
    cfg = _config(**where, data_root=str(task), embed_model="ViT-B/32")
    with pytest.raises(SourceError, match="did you mean 'ViT-B-32'"):
        run_subset(cfg, from_step="embed-text", to_step="embed-text")
    assert not os.path.exists(run)


def test_second_run_on_same_directory_is_refused(tmp_path):
    run = str(tmp_path / "run")
    cfg = _config(dataset="FashionMNIST", metadata=str(tmp_path), run_dir=run)
    with io.RunLock(run):
        with pytest.raises(io.LockedError, match="in use by another run"):
            run_subset(cfg, from_step="embed-text", to_step="embed-text")
    # The lock is released with its holder: now the run proceeds.
    run_subset(cfg, from_step="embed-text", to_step="embed-text")
    assert io.is_done(os.path.join(run, STAGE_OUT["embed-text"]))


def test_killed_demo_resumes_to_the_same_outputs(demo_run, port, tmp_path):
    """SIGKILL `primer demo` at seeded random moments; each rerun ends where a clean run does."""
    import random

    rng = random.Random(7)
    run = str(tmp_path / "killed")
    exe = os.path.join(os.path.dirname(sys.executable), "primer")
    cmd = [exe, "demo", "--out", run, "--port", str(port), "--rows", str(ROWS)]
    for delay in sorted(rng.uniform(5, 25) for _ in range(2)):
        proc = subprocess.Popen(
            cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # Nothing half-written is visible: every complete-looking output is really complete.
        for stage in STAGES[:-1]:
            out = os.path.join(run, STAGE_OUT[stage])
            if os.path.exists(os.path.join(out, "_SUCCESS")):
                assert not any(n.startswith(".") and ".tmp-" in n for n in os.listdir(out))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for stage, name in (
        ("clip-filter", "decision.parquet"),
        ("transductive", "decision.parquet"),
        ("evaluate", "results.md"),
    ):
        assert _bytes(demo_run, stage, name) == _bytes(run, stage, name), stage


def test_notebook_executes_on_demo_output(demo_run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    nb = nbformat.read(os.path.join(repo, "notebooks", "inspect_subset.ipynb"), as_version=4)
    monkeypatch.setenv("PRIMER_RUN_DIR", demo_run)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": repo}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_notebook_opened_from_notebooks_finds_the_demo(demo_run, tmp_path):
    """Jupyter started in notebooks/ (its working directory) finds ../data/demo."""
    import nbformat
    from nbclient import NotebookClient

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "data").mkdir()
    os.symlink(demo_run, tmp_path / "data" / "demo")
    (tmp_path / "notebooks").mkdir()
    nb = nbformat.read(os.path.join(repo, "notebooks", "inspect_subset.ipynb"), as_version=4)
    env_before = os.environ.pop("PRIMER_RUN_DIR", None)
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3",
            resources={"metadata": {"path": str(tmp_path / "notebooks")}},
        ).execute()  # fmt: skip
    finally:
        if env_before is not None:
            os.environ["PRIMER_RUN_DIR"] = env_before
    printed = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "10 classes in ../data/demo" in printed


def test_report_of_a_directory_without_outputs_is_a_clear_error(tmp_path, caplog):
    from pipeline.app.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no stage output" in caplog.text and "primer subset" in caplog.text
    assert not (tmp_path / "empty" / "report").exists()


def test_report_opens_only_the_shards_it_shows(demo_run, tmp_path, monkeypatch):
    """The report reads images from the shards the download manifest names for them."""
    from pipeline.report import page

    opened = []
    real = page.io.url_to_fs

    def spy(url, **kw):
        if url.endswith(".tar"):
            opened.append(os.path.basename(url))
        return real(url, **kw)

    monkeypatch.setattr(page.io, "url_to_fs", spy)
    summary = page.collect_run(demo_run, per_class=1)
    manifest = io.read_parquet(os.path.join(demo_run, "shards", "manifest.parquet")).to_pylist()
    shard_of = {r["uid"]: r["shard"] for r in manifest}
    shown = {e.uid for exs in summary.examples.values() for e in exs if e.image}
    assert shown and set(opened) == {f"{shard_of[u]}.tar" for u in shown}
    # One image: only its shard is opened.
    uid = sorted(shown)[0]
    opened.clear()
    got = page._images_for(os.path.join(demo_run, "shards"), {uid}, {shard_of[uid]})
    assert set(got) == {uid} and opened == [f"{shard_of[uid]}.tar"]


def test_report_lists_every_class(demo_run):
    from pipeline.demo.imageserver import FASHION_CLASSES

    html = open(os.path.join(demo_run, "report", "index.html"), encoding="utf-8").read()
    for c in FASHION_CLASSES:
        assert f": {c} <small>" in html
    assert "data:image/jpeg;base64," in html and "meaningless" not in html


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (make install adds it)",
)
def test_report_renders_in_headless_chromium(demo_run, tmp_path):
    from pipeline.demo.imageserver import FASHION_CLASSES

    page = os.path.join(demo_run, "report", "index.html")
    r = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            f"file://{page}",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert all(f": {c} <small>" in dom for c in FASHION_CLASSES)
    console_errors = [
        ln
        for ln in r.stderr.splitlines()
        if "CONSOLE" in ln and ("Error" in ln or "Uncaught" in ln)
    ]
    assert not console_errors


def _stage_view(run: str, stage: str):
    """What the next stage sees of ``stage``'s output, in a comparable form."""
    import pyarrow.dataset as pds

    from pipeline.core import embeddings as E

    out = os.path.join(run, STAGE_OUT[stage])
    if stage == "filter":  # source_file names the run's own copy of the inputs
        return pds.dataset(out).to_table().drop_columns(["source_file"]).sort_by("uid").to_pylist()
    if stage == "download":
        import tarfile

        uids = []
        for name in sorted(os.listdir(out)):
            if name.endswith(".tar"):
                with tarfile.open(os.path.join(out, name)) as tf:
                    for m in tf.getmembers():
                        if m.name.endswith(".json"):
                            uids.append(json.loads(tf.extractfile(m).read())["uid"])
        assert len(uids) == len(set(uids)), "a sample appears twice in the shards"
        return sorted(uids)
    if stage.startswith("embed-") and stage != "embed-text":
        uids, labels, feats = E.load(out)
        return list(uids), labels.tolist(), feats.tobytes()
    name = {"materialise": "manifest.parquet", "evaluate": "results.md"}.get(
        stage, "decision.parquet"
    )
    return _bytes(run, stage, name)


@pytest.mark.parametrize(
    "stage",
    ["filter", "download", "embed-pool", "clip-filter", "transductive", "materialise", "evaluate"],
)
def test_each_stage_killed_part_way_resumes_to_the_same_output(demo_run, port, tmp_path, stage):
    """Redo one stage of a finished demo and SIGKILL it at a seeded random moment after it
    starts writing, then kill its resumed run the same way; a final rerun must leave the
    stage's output equal to the uninterrupted run's (same rows, no duplicate samples, same
    bytes for decisions). The next stage reads only complete outputs (_SUCCESS, checked by
    every reader)."""
    import random

    rng = random.Random(f"kill-{stage}")
    run = str(tmp_path / "run")
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("_LOCK"))
    out = os.path.join(run, STAGE_OUT[stage])
    before = set(os.listdir(out))
    exe = os.path.join(os.path.dirname(sys.executable), "primer")
    cmd = [exe, "demo", "--out", run, "--port", str(port), "--rows", str(ROWS)]

    def listing() -> set[str]:
        try:  # the stage may remove its output directory between any two calls
            return set(os.listdir(out))
        except FileNotFoundError:
            return set()

    # Two kills: the first into the redone stage, the second into its resumed run.
    for attempt in range(2):
        proc = subprocess.Popen(
            [*cmd, "--redo", stage] if attempt == 0 else cmd,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            # The stage has started once its output differs from what was there before it
            # (the overwrite clears it; a resumed run adds to it).
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None:
                now = listing()
                if now != before and "_SUCCESS" not in now:
                    break
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.5))
        finally:  # never left running (its image server would hold the port for later tests)
            with contextlib.suppress(ProcessLookupError):  # a fast stage may have finished
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        now = listing()
        if "_SUCCESS" in now:
            break  # it finished before the kill; it is checked below like any output
        before = now
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert io.is_done(out)
    assert _stage_view(run, stage) == _stage_view(demo_run, stage)
