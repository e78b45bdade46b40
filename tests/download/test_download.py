"""Issue 4: the download stage against the loopback image server (real img2dataset).

Every URL here points at 127.0.0.1. Where the opt-in ``allow_private_addresses`` is off, the
tests prove that nothing was fetched (the server's request counter does not move).
"""

from __future__ import annotations

import importlib.util
import io as _io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pytest
from PIL import Image

from pipeline.app.registry import resolve
from pipeline.core import io
from pipeline.core.config import ConfigError
from pipeline.download.stage import (
    DownloadConfig,
    build_manifest,
    dedupe,
    failure_reason,
    read_shard_results,
    run_download,
    split_allowed,
    stage_input,
    summarize,
)

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Small and quick; only loopback URLs appear, let through where the opt-in is on.
FAST = dict(processes=1, threads=8, timeout=2, retries=0, image_size=64, samples_per_shard=8)


def _matches(tmp_path, server, paths, name="matches", labels=None):
    """A text-filter output (parquet + _SUCCESS) of rows whose URLs point at ``server``."""
    urls = [server.url(p) for p in paths]
    caps = [f"caption {i} of {p}" for i, p in enumerate(paths)]
    labels = labels or [i % 3 for i in range(len(paths))]
    t = pa.table(
        {
            "uid": [io.make_uid(u, c) for u, c in zip(urls, caps)],
            "url": urls,
            "caption": caps,
            "label": pa.array(labels, pa.int32()),
            "class_name": [f"class{x}" for x in labels],
            "matched_term": [f"class{x}" for x in labels],
            "width": pa.array([64] * len(paths), pa.int64()),
        }
    )
    d = str(tmp_path / name)
    io.write_parquet(t, io.join(d, "part-00000.parquet"))
    io.mark_done(d)
    return d, t


def _read_shards(out):
    """{uid: (sample, json)} over every tar at ``out`` (local or s3://); fails on a repeat."""
    import webdataset as wds

    samples = {}
    for tar in io.list_files(out, suffixes=(".tar",)):
        if not io.is_local(tar):  # read an object-store shard from a local copy
            local = os.path.join(tempfile.mkdtemp(), os.path.basename(tar))
            with open(local, "wb") as f:
                f.write(io.read_bytes(tar))
            tar = local
        for s in wds.WebDataset(tar, shardshuffle=False, empty_check=False):
            meta = json.loads(s["json"])
            assert meta["uid"] not in samples, "a uid appears twice in the shards"
            samples[meta["uid"]] = (s, meta)
    return samples


GOOD = [f"fmnist/train/{i}.jpg" for i in range(10)] + [
    "fmnist/test/3.png",
    "skimage/chelsea.png",
    "skimage/coffee.jpg",
]
BAD = {
    "status/404": "http_404",
    "status/500": "http_error",
    "slow/5/fmnist/train/1.jpg": "timeout",
    "truncated/skimage/coffee.jpg": "decode_error",
    "garbage/x.jpg": "decode_error",
    "notimage/x.jpg": "not_image",
    "noai/fmnist/train/3.jpg": "robots_optout",
    "bomb.png": "too_large",
    "reset/x.jpg": "connection_error",
}


def test_download_real_images_and_count_failures(tmp_path, image_server):
    matches, table = _matches(tmp_path, image_server, GOOD + list(BAD))
    out = str(tmp_path / "shards")
    stats = run_download(DownloadConfig(**FAST, allow_private_addresses=True), matches, out)
    assert stats["total"] == len(GOOD) + len(BAD) and stats["success"] == len(GOOD)
    expected = {}
    for reason in BAD.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert stats["failures_by_reason"] == expected
    assert sum(c["total"] for c in stats["per_class"].values()) == stats["total"]

    # Shards: real images, resized keeping the aspect ratio, captions and metadata by uid.
    samples = _read_shards(out)
    rows = {r["uid"]: r for r in table.to_pylist()}
    assert set(samples) == {r["uid"] for r in rows.values() if r["url"].split("/", 3)[3] in GOOD}
    for uid, (s, meta) in samples.items():
        row = rows[uid]
        assert (meta["label"], meta["class_name"], meta["url"]) == (
            row["label"],
            row["class_name"],
            row["url"],
        )
        assert s["txt"].decode() == row["caption"]
        img = Image.open(_io.BytesIO(s["jpg"]))
        img.load()
        assert min(img.size) == 64  # keep_ratio: short side = image_size
        if "chelsea" in row["url"]:  # a 451x300 photo keeps its aspect ratio
            assert img.size == (96, 64)

    # Manifest: one row per input row, every failure with its reason and message.
    manifest = io.read_parquet(io.join(out, "manifest.parquet"))
    assert manifest.num_rows == table.num_rows
    by_path = {r["url"].split("/", 3)[3]: r for r in manifest.to_pylist()}
    for path in GOOD:
        r = by_path[path]
        assert r["status"] == "success" and r["shard"] is not None and r["key"] is not None
        assert samples[r["uid"]][1]["key"] == r["key"]
    for path, reason in BAD.items():
        assert by_path[path]["reason"] == reason, (path, by_path[path]["error_message"])
        assert by_path[path]["status"] != "success" and by_path[path]["error_message"]
    assert io.is_done(out) and os.path.exists(os.path.join(out, "00000_stats.json"))
    assert not os.path.exists(os.path.join(out, "_input")) and not os.path.exists(
        os.path.join(out, "_tmp")
    )

    # A complete output is skipped on rerun: nothing is fetched again.
    hits = image_server.hits
    assert run_download(DownloadConfig(**FAST, allow_private_addresses=True), matches, out) == stats
    assert image_server.hits == hits


def test_refusal_without_opt_in_fetches_nothing(tmp_path, image_server):
    paths = [f"fmnist/train/{i}.jpg" for i in range(5)]
    matches, _ = _matches(tmp_path, image_server, paths)
    hits = image_server.hits
    out = str(tmp_path / "shards")
    stats = run_download(DownloadConfig(**FAST), matches, out)
    assert image_server.hits == hits  # not one request reached the server
    assert stats["success"] == 0 and stats["refused_address"] == 5
    assert stats["failures_by_reason"] == {"refused_address": 5}
    manifest = io.read_parquet(io.join(out, "manifest.parquet"))
    assert set(manifest.column("status").to_pylist()) == {"refused_address"}
    assert not any(n.endswith(".tar") for n in os.listdir(out)) and io.is_done(out)


def test_connect_time_check_refuses_private_peers(image_server):
    """The check on the address a host resolved to (redirects, DNS): loopback without the
    opt-in is refused after the TCP connect and before any request byte is sent."""
    from pipeline.download import limits as lim

    hits = image_server.hits
    with pytest.raises(ConnectionRefusedError, match="refused_address"):
        lim.checked_create_connection(("127.0.0.1", image_server.port), 2, allow_private=False)
    saved = dict(lim._LIMITS)
    try:
        lim._LIMITS["allow_private"] = False
        key, stream, err = lim.download_image(
            (7, image_server.url("fmnist/train/1.jpg")), 2, None, None
        )
        assert (key, stream) == (7, None) and failure_reason(err) == "refused_address", err
        assert image_server.hits == hits
        lim._LIMITS["allow_private"] = True
        _, stream, err = lim.download_image(
            (7, image_server.url("fmnist/train/1.jpg")), 2, None, None
        )
        assert err is None and Image.open(stream).size == (64, 64)
    finally:
        lim._LIMITS.update(saved)


def test_robots_optout_can_be_turned_off(tmp_path, image_server):
    matches, _ = _matches(tmp_path, image_server, ["noai/fmnist/train/3.jpg", "fmnist/train/4.jpg"])
    s = run_download(
        DownloadConfig(**FAST, allow_private_addresses=True, respect_robots_optout=False),
        matches,
        str(tmp_path / "o"),
    )
    assert s["success"] == 2


def test_output_on_s3(tmp_path, image_server, s3_bucket):
    matches, table = _matches(
        tmp_path, image_server, [f"fmnist/train/{i}.jpg" for i in range(6)] + ["status/404"]
    )
    out = io.join(s3_bucket, "shards")
    stats = run_download(DownloadConfig(**FAST, allow_private_addresses=True), matches, out)
    assert (
        stats["success"] == 6 and stats["failures_by_reason"] == {"http_404": 1} and io.is_done(out)
    )
    assert len(io.list_files(out, suffixes=(".tar",))) == 1
    assert set(_read_shards(out)) == set(table.column("uid").to_pylist()[:6])
    assert io.read_parquet(io.join(out, "manifest.parquet")).num_rows == 7
    assert not io.exists(io.join(out, "_tmp")) and not io.exists(io.join(out, "_input"))


def test_resume_finishes_missing_shards_without_duplicates(tmp_path, image_server):
    paths = [f"fmnist/train/{i}.jpg" for i in range(20)]
    matches, _ = _matches(tmp_path, image_server, paths)
    out = str(tmp_path / "shards")
    cfg = DownloadConfig(**FAST, allow_private_addresses=True)
    run_download(cfg, matches, out)
    first = _read_shards(out)
    # A run that died during shard 00001: its stats file (the shard's completion marker) never
    # appeared, shard 00002 was not started, and the stage's own files are not written yet.
    for name in os.listdir(out):
        if name.startswith("00002") or name in (
            "00001_stats.json",
            "_SUCCESS",
            "manifest.parquet",
            "stats.json",
        ):
            os.unlink(os.path.join(out, name))
    hits = image_server.hits
    stats = run_download(cfg, matches, out)
    assert image_server.hits - hits == 12  # only the two unfinished shards were fetched again
    assert stats["success"] == 20 and set(_read_shards(out)) == set(first)


def test_killed_run_resumes(tmp_path, image_server, capsys):
    """SIGKILL a real `primer download` part way, rerun it, compare with the full input."""
    paths = [f"slow/0.2/fmnist/train/{i}.jpg" for i in range(24)]
    matches, table = _matches(tmp_path, image_server, paths)
    out = str(tmp_path / "shards")
    args = ["download", "--matches", matches, "--out", out, "--processes", "1", "--threads", "2",
            "--set", "download.allow_private_addresses=true", "--set", "download.samples_per_shard=4",
            "--set", "download.timeout=5", "--set", "download.image_size=32"]  # fmt: skip
    exe = os.path.join(os.path.dirname(sys.executable), "primer")
    proc = subprocess.Popen(
        [exe, *args], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 90
    # Kill it (and its workers) once one shard is finished, while others are under way.
    while time.time() < deadline:
        if os.path.isdir(out) and any(n.endswith("_stats.json") for n in os.listdir(out)):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {n for n in os.listdir(out) if n.endswith("_stats.json")}
    assert done_before and not io.is_done(out)

    from pipeline.app.cli import main

    capsys.readouterr()
    assert main(args) == 0
    assert (
        capsys.readouterr().out == f"24/24 images downloaded -> {out}\n"
    )  # stdout: the result only
    samples = _read_shards(out)
    assert set(samples) == set(table.column("uid").to_pylist())
    manifest = io.read_parquet(io.join(out, "manifest.parquet"))
    assert manifest.num_rows == 24 and set(manifest.column("status").to_pylist()) == {"success"}


def test_spark_job_uses_pyspark_distributor(tmp_path, image_server, spark):
    """jobs/download.py (the spark-submit entry point) on the test's local Spark session."""
    matches, table = _matches(
        tmp_path, image_server, [f"fmnist/train/{i}.jpg" for i in range(10)] + ["status/404"]
    )
    out = str(tmp_path / "shards")
    sys.path.insert(0, os.path.join(_REPO, "jobs"))
    try:
        spec = importlib.util.spec_from_file_location(
            "primer_job_download", os.path.join(_REPO, "jobs", "download.py")
        )
        job = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(job)
    finally:
        sys.path.remove(os.path.join(_REPO, "jobs"))
    argv = ["--matches", matches, "--out", out, "--threads", "4", "--set", "download.allow_private_addresses=true",
            "--set", "download.samples_per_shard=4", "--set", "download.image_size=32", "--set", "download.retries=0"]  # fmt: skip
    assert job.run(argv) == 0
    stats = io.read_json(io.join(out, "stats.json"))
    assert stats["success"] == 10 and stats["failures_by_reason"] == {"http_404": 1}
    assert io.read_json(io.join(out, "config.json"))["distributor"] == "pyspark"
    assert len(_read_shards(out)) == 10 and len(io.list_files(out, suffixes=(".tar",))) == 3
    assert not spark.sparkContext._jsc.sc().isStopped()  # img2dataset left our session running


def test_input_without_success_is_refused(tmp_path):
    d = tmp_path / "m"
    io.write_parquet(pa.table({"uid": ["a"]}), str(d / "p.parquet"))
    with pytest.raises(io.InputError, match="not a complete text-filter output"):
        run_download(DownloadConfig(), str(d), str(tmp_path / "o"))
    io.mark_done(str(d))
    with pytest.raises(
        io.InputError, match=r"missing columns \['caption', 'class_name', 'label', 'url'\]"
    ):
        run_download(DownloadConfig(), str(d), str(tmp_path / "o"))


def test_bad_config_is_one_clear_error():
    with pytest.raises(ConfigError) as e:
        resolve(None, ["download.processes=-1", "download.resize_mode=stretch"])
    assert "processes" in str(e.value) and "resize_mode" in str(e.value)


def _rows(urls, labels, uids=None):
    return pa.table(
        {
            "uid": uids or [io.make_uid(u, "") for u in urls],
            "url": urls,
            "caption": ["c"] * len(urls),
            "label": pa.array(labels, pa.int32()),
            "class_name": [f"k{x}" for x in labels],
        }
    )


def test_manifest_core_two_labels_duplicates_and_missing():
    """The pure core: a uid matched by two classes keeps both rows; exact repeats are dropped;
    rows in no finished shard are `missing`; refused rows carry their reason."""
    urls = [
        "http://a.example/1.jpg",
        "http://a.example/2.jpg",
        "http://10.0.0.1/x.jpg",
        "http://a.example/1.jpg",
    ]
    table = _rows(urls, [0, 1, 1, 0])
    two_labels = _rows([urls[0]], [2], uids=[table.column("uid")[0].as_py()])
    rows, dropped = dedupe(pa.concat_tables([table, two_labels]))
    assert dropped == 1 and rows.num_rows == 4
    allowed, refused = split_allowed(rows, allow_private=False)
    assert refused.column("reason").to_pylist() == ["refused_address"] and allowed.num_rows == 3
    uid0, uid1 = allowed.column("uid")[0].as_py(), allowed.column("uid")[1].as_py()
    got = pa.table(
        {
            "uid": [uid0, uid0],
            "label": pa.array([0, 2], pa.int32()),
            "key": ["000000000", "000000001"],
            "status": ["success", "failed_to_download"],
            "error_message": [None, "<urlopen error timed out>"],
            "shard": ["00000", "00000"],
        }
    )
    m = build_manifest(got, allowed, refused)
    assert m.num_rows == 4
    by = {(r["uid"], r["label"]): r for r in m.to_pylist()}
    assert by[(uid0, 0)]["reason"] == "success" and by[(uid0, 2)]["reason"] == "timeout"
    assert by[(uid1, 1)]["status"] == "missing" and by[(uid1, 1)]["shard"] is None
    s = summarize(m)
    assert s["failures_by_reason"] == {"missing": 1, "refused_address": 1, "timeout": 1}
    assert s["per_class"]["k0"] == {"total": 1, "success": 1, "success_rate": 1.0}
    assert s["success_rate"] == 0.25


def test_rerun_over_a_different_list_is_refused(tmp_path):
    out = str(tmp_path / "o")
    stage_input(_rows(["http://a.example/1.jpg"], [0]), out)
    assert read_shard_results(out).num_rows == 0
    with pytest.raises(io.InputError, match="different list"):
        stage_input(_rows(["http://a.example/2.jpg"], [0]), out)


@pytest.mark.parametrize(
    "message,reason",
    [
        ("HTTP Error 404: Not Found", "http_404"),
        ("HTTP Error 503: Service Unavailable", "http_error"),
        ("<urlopen error timed out>", "timeout"),
        ("The read operation timed out", "timeout"),
        ("Use of image disallowed by X-Robots-Tag directive", "robots_optout"),
        ("image too large: 900000000 pixels > 89478485", "too_large"),
        ("image area too large", "too_large"),
        ("not an image (Content-Type text/html)", "not_image"),
        (
            "<urlopen error refused_address: 127.0.0.1 is 127.0.0.1, not a public address>",
            "refused_address",
        ),
        ("Remote end closed connection without response", "connection_error"),
        ("image too small", "size_filter"),
        ("something new", "other"),
        (None, "other"),
    ],
)
def test_failure_reasons(message, reason):
    assert failure_reason(message) == reason
