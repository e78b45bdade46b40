"""Issue 2: I/O conventions, configuration layering and the CLI skeleton."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pytest

from pipeline.app.cli import main
from pipeline.core import io
from pipeline.core.config import ConfigError, build, load_config, parse_set

# ------------------------------------------------------------------ uid


def test_uid_is_stable_128_bit_hex_and_distinguishes_fields():
    u = io.make_uid("http://a/x.jpg", "a cat")
    assert len(u) == 32 and int(u, 16) >= 0
    assert u == io.make_uid("http://a/x.jpg", "a cat")
    assert u != io.make_uid("http://a/x.jpg", "a cat ")
    # The separator keeps (url+caption) boundaries apart.
    assert io.make_uid("ab", "c") != io.make_uid("a", "bc")
    assert io.make_uid(None, None) == io.make_uid("", "")
    # Lone surrogates (from badly decoded captions) hash instead of crashing.
    assert len(io.make_uid("u", "bad \udcff")) == 32
    arr = io.make_uids(pa.array(["u1", "u2"]), pa.array(["c1", None]))
    assert arr.to_pylist() == [io.make_uid("u1", "c1"), io.make_uid("u2", "")]


# ------------------------------------------------------------------ atomic writes


def test_atomic_open_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "file.bin"
    io.write_bytes(str(target), b"old")
    with pytest.raises(RuntimeError):
        with io.atomic_open(str(target)) as f:
            f.write(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(target.parent)) == ["file.bin"]


def test_staged_file_appears_only_on_commit(tmp_path):
    target = tmp_path / "out" / "file.bin"
    io.write_bytes(str(target), b"old")
    staged = io.StagedFile(str(target))
    with staged.open() as f:
        f.write(b"new")
    assert target.read_bytes() == b"old"  # written, not yet published
    staged.commit()
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(target.parent)) == ["file.bin"]  # no temporary left
    dropped = io.StagedFile(str(target))
    with dropped.open() as f:
        f.write(b"never")
    dropped.discard()
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(target.parent)) == ["file.bin"]


def test_staged_file_fsyncs_through_the_writing_descriptor(tmp_path, monkeypatch):
    """Commit's fsync uses a duplicate of the descriptor the data was written through (it
    shares its writeback errors; a descriptor opened at commit time may not see them)."""
    dups, synced = [], []
    real_dup, real_fsync = os.dup, os.fsync
    monkeypatch.setattr(os, "dup", lambda fd: dups.append(real_dup(fd)) or dups[-1])
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    staged = io.StagedFile(str(tmp_path / "f.bin"))
    with staged.open() as f:
        f.write(b"x")
    staged.commit()
    assert synced == dups and len(dups) == 1
    assert staged._fd is None  # the duplicate closed by the commit
    with pytest.raises(RuntimeError, match="commit before open"):
        io.StagedFile(str(tmp_path / "g.bin")).commit()


def test_staged_file_on_s3_is_uploaded_on_commit(s3_bucket):
    url = io.join(s3_bucket, "d", "file.bin")
    staged = io.StagedFile(url)
    with staged.open() as f:
        f.write(b"payload")
    assert not io.exists(url)
    staged.commit()
    assert io.read_bytes(url) == b"payload"
    assert not os.path.exists(staged._tmp)
    never_opened = io.StagedFile(io.join(s3_bucket, "d", "empty.bin"))
    with pytest.raises(RuntimeError, match="commit before open"):
        never_opened.commit()
    assert not io.exists(io.join(s3_bucket, "d", "empty.bin"))
    assert not os.path.exists(never_opened._tmp)


def test_markers_and_prepare(tmp_path):
    from pipeline.core import fingerprint

    out = str(tmp_path / "stage")
    fp = fingerprint.make("stage", 1, {"k": 1})
    assert fingerprint.prepare(out, fp) is True
    io.write_json(io.join(out, "stats.json"), {"rows": 1})
    assert not io.is_done(out)
    io.mark_done(out, {"rows": 1})
    assert io.is_done(out)
    assert fingerprint.prepare(out, fp) is False
    assert fingerprint.prepare(out, fp, overwrite=True) is True
    assert not io.exists(io.join(out, "stats.json"))


def test_list_files_sorted_skips_markers_and_hidden(tmp_path):
    for name in ["b.parquet", "a.parquet", "_SUCCESS", ".a.parquet.tmp-1", "c.txt"]:
        (tmp_path / name).write_bytes(b"x")
    assert io.list_files(str(tmp_path), suffixes=(".parquet",)) == [
        str(tmp_path / "a.parquet"),
        str(tmp_path / "b.parquet"),
    ]
    assert io.list_files(str(tmp_path / "*.txt")) == [str(tmp_path / "c.txt")]
    with pytest.raises(FileNotFoundError, match="no input files"):
        io.list_files(str(tmp_path / "missing"))


def test_json_bytes_are_stable(tmp_path):
    io.write_json(str(tmp_path / "a.json"), {"b": 1, "a": [1, 2]})
    io.write_json(str(tmp_path / "b.json"), {"a": [1, 2], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_atomic_write_to_s3(s3_bucket):
    url = io.join(s3_bucket, "x", "y.json")
    io.write_json(url, {"k": "v"})
    assert io.read_json(url) == {"k": "v"}
    io.mark_done(io.join(s3_bucket, "x"))
    assert io.is_done(io.join(s3_bucket, "x"))


# ------------------------------------------------------------------ config


def test_parse_set_nested_and_typed():
    assert parse_set(["a.b=3", "a.c=true", "d=x y", "e=[1, 2]"]) == {
        "a": {"b": 3, "c": True},
        "d": "x y",
        "e": [1, 2],
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["novalue"])


def test_config_layers_default_user_file_then_set(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("run:\n  root: /scratch/primer\n  seed: 5\n")
    cfg = load_config(str(user), ["run.seed=7"])
    assert cfg["run"] == {"root": "/scratch/primer", "seed": 7}
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_build_validates_all_problems_at_once():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Cfg:
        k: int = 10
        p: float = 0.5
        mode: str = "a"
        tags: tuple[str, ...] = ()

        def __post_init__(self):
            if not 0 <= self.p <= 1:
                raise ValueError("p must be in [0, 1]")

    assert build(Cfg, {"k": 3, "p": 1, "tags": "x,y"}) == Cfg(k=3, p=1.0, tags=("x", "y"))
    with pytest.raises(ConfigError) as e:
        build(Cfg, {"k": "ten", "bogus": 1, "p": "x"}, where="demo")
    msg = str(e.value)
    assert (
        "bogus" in msg
        and "k: expected an integer" in msg
        and "p: expected a number" in msg
        and "'demo'" in msg
    )
    with pytest.raises(ConfigError, match="p must be in"):
        build(Cfg, {"p": 3})


# ------------------------------------------------------------------ CLI


def test_cli_classes_counts(capsys):
    assert main(["classes", "StanfordCars"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 196 and lines[0] == "AM General Hummer SUV 2000"
    assert main(["classes", "ImageNet-R"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 200


def test_cli_classes_user_yaml_and_prompts(tmp_path, capsys):
    y = tmp_path / "mine.yaml"
    y.write_text(
        'name: Mine\nclasses: [tabby cat, "Rolls-Royce Ghost"]\ntemplates: ["a photo of a {}.", "art of the {}."]\n'
    )
    assert main(["classes", str(y)]) == 0
    assert capsys.readouterr().out.splitlines() == ["tabby cat", "Rolls-Royce Ghost"]
    assert main(["classes", str(y), "--prompts"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        "0\ta photo of a tabby cat.",
        "0\tart of the tabby cat.",
    ]


def test_cli_reports_bad_dataset_clearly(tmp_path, caplog):
    y = tmp_path / "bad.yaml"
    y.write_text("classes: [a, a, '']\ntemplates: ['no placeholder']\n")
    assert main(["classes", str(y)]) == 2
    text = caplog.text
    assert (
        "duplicate class name 'a'" in text and "empty class name" in text and "exactly one" in text
    )
    assert main(["classes", "NoSuchDataset"]) == 2
    assert "unknown dataset" in caplog.text


def test_cli_config_prints_resolved_yaml(capsys):
    import yaml

    assert main(["config", "--set", "run.root=s3://b/runs", "--section", "run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == {"run": {"root": "s3://b/runs"}}


def test_console_script_help_runs():
    exe = os.path.join(os.path.dirname(sys.executable), "primer")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "classes" in out and "config" in out
