"""Strict configuration: every section checked against its dataclass, one source of defaults,
misspellings named with the closest valid key, in `primer config` and in every command."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import yaml

from pipeline.app.cli import main
from pipeline.app.registry import SECTIONS, resolve, section_classes
from pipeline.app.stages import STAGES
from pipeline.core.config import CONF_DIR, ConfigError, load_config


def test_yaml_defaults_equal_the_dataclass_defaults():
    """conf/default.yaml and conf/stages/*.yaml hold every setting, with the dataclasses' values."""
    raw = load_config()
    classes = section_classes()
    assert set(raw) == set(classes), "a section without a YAML or a YAML without a section"
    for name, cls in classes.items():
        want = {}
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            want[f.name] = list(default) if isinstance(default, tuple) else default
        got = dict(raw[name])
        assert set(got) == set(want), (name, set(got) ^ set(want))
        for key, value in want.items():
            assert got[key] == value, f"{name}.{key}: YAML {got[key]!r}, dataclass {value!r}"


@pytest.mark.parametrize(
    "setting, message",
    [
        ("filtr.x=1", "unknown config section 'filtr' (did you mean 'filter'?)"),
        (
            "filter.keep_ambigous=true",
            "unknown key 'keep_ambigous' (did you mean 'keep_ambiguous'?)",
        ),
        ("select.k=ten", "k: expected an integer, got 'ten'"),
        ("embed.batch_size=1.5", "batch_size: expected an integer"),
        ("subset.k=3", "unknown key 'k' (it is now 'select.k')"),
        ("evaluate.head=linear", "head must be centroid or tip-adapter"),
    ],
)
def test_a_bad_setting_fails_every_command_before_it_runs(setting, message, tmp_path, caplog):
    assert main(["config", "--set", setting]) == 2
    assert message in caplog.text
    caplog.clear()
    # A stage that does not read the section fails too, before touching its output.
    out = tmp_path / "out"
    argv = ["embed-text", "--dataset", "FashionMNIST", "--out", str(out), "--set", setting]
    assert main(argv) == 2 and message in caplog.text
    assert not out.exists()
    caplog.clear()
    argv = ["subset", "--dataset", "FashionMNIST", "--run-dir", str(tmp_path / "r")]
    assert main([*argv, "--set", setting]) == 2 and message in caplog.text
    assert not (tmp_path / "r").exists()


def test_a_bad_config_file_names_every_problem(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("select: {k: 3, nprob: 4}\ndownlaod: {threads: 2}\n")
    with pytest.raises(ConfigError) as e:
        resolve(str(f))
    assert "'nprob' (did you mean 'nprobe'?)" in str(e.value)
    assert "'downlaod' (did you mean 'download'?)" in str(e.value)


def test_primer_config_shows_every_setting_a_run_uses(capsys):
    assert main(["config", "--set", "select.k=3", "--set", "embed.model=ViT-B-32"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert set(shown) == set(SECTIONS)
    assert shown["select"]["k"] == 3 and shown["embed"]["model"] == "ViT-B-32"
    # Settings only the dataclass knew are shown too (every field of every section).
    for name, cls in section_classes().items():
        assert set(shown[name]) == {f.name for f in dataclasses.fields(cls)}


def test_help_shows_defaults_and_the_config_keys(capsys):
    with pytest.raises(SystemExit):
        main(["transductive", "--help"])
    text = capsys.readouterr().out
    assert "(default 10; config key select.k)" in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("primer ")


def test_old_spellings_still_work(tmp_path, caplog):
    """`embed` is `embed-pool`, `--root` is `--data-root`, precision bf16 is amp_bf16."""
    from pipeline.app.cli import build_parser

    p = build_parser()
    a = p.parse_args(["embed", "--shards", "s", "--out", "o"])
    b = p.parse_args(["embed-pool", "--shards", "s", "--out", "o"])
    assert a.func and a.input__shards == b.input__shards == "s"
    a = p.parse_args(
        ["embed-task", "--dataset", "d", "--split", "test", "--root", "r", "--out", "o"]
    )
    assert a.param__data_root == "r"
    cfg = resolve(None, ["embed.precision=bf16", "embed.device=cuda"])["embed"]
    assert cfg.precision == "amp_bf16" and "now called 'amp_bf16'" in caplog.text
    a = p.parse_args(["subset", "--dataset", "d", "--overwrite", "filter"])
    assert a.redo == ["filter"]
    a = p.parse_args(["subset", "--dataset", "d", "--device", "cuda:1"])
    assert resolve(None, [], {"embed.device": a.embed__device})["embed"].device == "cuda:1"


def test_every_registry_stage_has_a_command_and_a_section():
    classes = section_classes()
    for stage in STAGES.values():
        assert stage.section is None or stage.section in classes
        assert callable(stage.function())
        for opt in stage.options:
            if "." in opt.to and ":" not in opt.to:
                section, key = opt.to.split(".")
                assert key in {f.name for f in dataclasses.fields(classes[section])}, opt.to


def test_the_configs_ship_with_the_package():
    """CONF_DIR is inside the package (pipeline/conf), the repository's conf/ in a checkout."""
    assert CONF_DIR.is_dir() and (CONF_DIR / "datasets" / "StanfordCars.yaml").is_file()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert os.path.samefile(CONF_DIR, os.path.join(repo, "conf"))


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_finds_its_configs(tmp_path):
    """`pip install .` (not editable) ships conf/: classes and config work from another dir."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), repo],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("primer-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("PRIMER_CONF_DIR", None)
    run = [sys.executable, "-c", "import sys; from pipeline.app.cli import main; sys.exit(main())"]

    def primer(*argv):
        r = subprocess.run(
            [*run, *argv], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    listed = primer("classes", "--list")
    assert "StanfordCars\t196" in listed and "ImageNet\t1000" in listed
    assert "FGVCAircraft" in listed
    assert yaml.safe_load(primer("config"))["select"]["k"] == 10
    where = subprocess.run(
        [sys.executable, "-c", "import pipeline.core.config as c; print(c.CONF_DIR)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert where.startswith(str(target))


def test_download_processes_follow_the_machine():
    cfg = resolve()["download"]
    assert cfg.processes == 0 and cfg.worker_processes() == (os.cpu_count() or 1)
    assert resolve(None, ["download.processes=3"])["download"].worker_processes() == 3


def test_the_docker_image_builds_from_a_small_context_on_any_architecture():
    """What docker build would use (no Docker engine here): a .dockerignore keeping the venv,
    data and git history out of the context, PyTorch's CPU wheels for the CPU image, and a
    JAVA_HOME that is not tied to one architecture."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ignored = open(os.path.join(repo, ".dockerignore")).read().split()
    assert {".venv", "data", ".git"} <= set(ignored)
    dockerfile = open(os.path.join(repo, "docker", "Dockerfile")).read()
    assert "amd64" not in dockerfile and "JAVA_HOME=/usr/lib/jvm/default-java" in dockerfile
    assert "download.pytorch.org/whl/cpu" in dockerfile and "-e " not in dockerfile
