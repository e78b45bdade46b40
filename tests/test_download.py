"""Issue 4: the download stage against the loopback image server (real img2dataset)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from pipeline import io
from pipeline.download import DownloadConfig, run_download

# Only loopback URLs appear in these tests; the opt-in lets them through where it is on.
FAST = dict(processes=1, threads=8, timeout=2, retries=0, image_size=64, samples_per_shard=8)


def _matches(tmp_path, server, paths, name="matches"):
    urls = [server.url(p) for p in paths]
    caps = [f"caption {i} of {p}" for i, p in enumerate(paths)]
    labels = [i % 3 for i in range(len(paths))]
    t = pa.table(
        {
            "uid": [io.make_uid(u, c) for u, c in zip(urls, caps)],
            "url": urls,
            "caption": caps,
            "label": pa.array(labels, pa.int32()),
            "class_name": [f"class{x}" for x in labels],
        }
    )
    d = str(tmp_path / name)
    io.write_parquet(t, io.join(d, "part-00000.parquet"))
    io.mark_done(d)
    return d, t


def _read_shards(out):
    import webdataset as wds

    samples = {}
    for tar in io.list_files(out, suffixes=(".tar",)):
        for s in wds.WebDataset(tar, shardshuffle=False, empty_check=False):
            meta = json.loads(s["json"])
            samples[meta["uid"]] = (s, meta)
    return samples


def test_download_real_images_and_count_failures(tmp_path, image_server):
    good = [f"fmnist/train/{i}.jpg" for i in range(12)] + ["skimage/chelsea.png", "skimage/coffee.png"]
    bad = ["status/404", "status/500", "slow/5/fmnist/train/1.jpg", "truncated/skimage/coffee.jpg", "notimage/x.jpg", "noai/fmnist/train/3.jpg", "bomb.png", "reset/x.jpg"]
    matches, table = _matches(tmp_path, image_server, good + bad)
    out = str(tmp_path / "shards")
    stats = run_download(DownloadConfig(**FAST, allow_private_addresses=True), matches, out)
    assert stats["total"] == len(good) + len(bad) and stats["success"] == len(good)
    assert stats["failures_by_reason"] == {
        "connection_error": 1, "decode_error": 1, "http_404": 1, "http_error": 1,
        "not_image": 1, "robots_optout": 1, "timeout": 1, "too_large": 1,
    }  # fmt: skip
    samples = _read_shards(out)
    rows = {r["uid"]: r for r in table.to_pylist()}
    assert len(samples) == len(good)
    for uid, (s, meta) in samples.items():
        assert meta["label"] == rows[uid]["label"] and meta["class_name"] == rows[uid]["class_name"]
        assert meta["url"] == rows[uid]["url"] and s["txt"].decode() == rows[uid]["caption"]
        from PIL import Image
        import io as _io

        img = Image.open(_io.BytesIO(s["jpg"]))
        assert min(img.size) == 64  # keep_ratio: short side = image_size
    manifest = io.read_parquet(io.join(out, "manifest.parquet"))
    assert sorted(manifest.column("uid").to_pylist()) == sorted(rows)
    assert set(manifest.column("status").to_pylist()) == {"success", "failed_to_download", "failed_to_resize"} or "success" in manifest.column("status").to_pylist()
    assert io.is_done(out) and os.path.exists(os.path.join(out, "00000_stats.json"))
    assert stats["per_class"]["class0"]["total"] > 0


def test_refusal_without_opt_in_fetches_nothing(tmp_path, image_server):
    matches, _ = _matches(tmp_path, image_server, [f"fmnist/train/{i}.jpg" for i in range(5)])
    hits = image_server.hits
    stats = run_download(DownloadConfig(**FAST), matches, str(tmp_path / "shards"))
    assert image_server.hits == hits  # not one request reached the server
    assert stats["success"] == 0 and stats["refused_address"] == 5
    assert stats["failures_by_reason"] == {"refused_address": 5}
    assert io.is_done(str(tmp_path / "shards"))


def test_robots_optout_can_be_turned_off(tmp_path, image_server):
    matches, _ = _matches(tmp_path, image_server, ["noai/fmnist/train/3.jpg", "fmnist/train/4.jpg"])
    s = run_download(DownloadConfig(**FAST, allow_private_addresses=True, respect_robots_optout=False), matches, str(tmp_path / "o"))
    assert s["success"] == 2


def test_output_on_s3(tmp_path, image_server, s3_bucket):
    matches, _ = _matches(tmp_path, image_server, [f"fmnist/train/{i}.jpg" for i in range(6)])
    out = io.join(s3_bucket, "shards")
    stats = run_download(DownloadConfig(**FAST, allow_private_addresses=True), matches, out)
    assert stats["success"] == 6 and io.is_done(out)
    assert len(io.list_files(out, suffixes=(".tar",))) == 1


def test_resume_finishes_missing_shards_without_duplicates(tmp_path, image_server):
    paths = [f"fmnist/train/{i}.jpg" for i in range(20)]
    matches, _ = _matches(tmp_path, image_server, paths)
    out = str(tmp_path / "shards")
    cfg = DownloadConfig(**FAST, allow_private_addresses=True)
    run_download(cfg, matches, out)
    first = _read_shards(out)
    # A run that died after shard 00000: the later shards and the markers are gone.
    for name in os.listdir(out):
        if name.startswith(("00001", "00002")) or name in ("_SUCCESS", "manifest.parquet", "stats.json"):
            os.unlink(os.path.join(out, name))
    hits = image_server.hits
    stats = run_download(cfg, matches, out)
    assert image_server.hits - hits == 12  # only the two missing shards were fetched again
    assert stats["success"] == 20 and set(_read_shards(out)) == set(first)


def test_killed_run_resumes(tmp_path, image_server):
    """SIGKILL a real `primer download` part way, rerun, compare with a clean run."""
    paths = [f"slow/0.2/fmnist/train/{i}.jpg" for i in range(24)]
    matches, _ = _matches(tmp_path, image_server, paths)
    out = str(tmp_path / "shards")
    exe = os.path.join(os.path.dirname(sys.executable), "primer")
    args = [exe, "download", "--matches", matches, "--out", out, "--processes", "1", "--threads", "2",
            "--set", "download.allow_private_addresses=true", "--set", "download.samples_per_shard=4", "--set", "download.timeout=5"]  # fmt: skip
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    # Kill it once the first shard is finished, while the others are under way.
    while time.time() < deadline:
        if os.path.isdir(out) and any(n.endswith("_stats.json") for n in os.listdir(out)):
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not io.is_done(out)
    assert subprocess.run(args, capture_output=True, timeout=120).returncode == 0
    samples = _read_shards(out)
    assert len(samples) == 24
    manifest = io.read_parquet(io.join(out, "manifest.parquet"))
    assert manifest.num_rows == 24 and set(manifest.column("status").to_pylist()) == {"success"}


def test_input_without_success_is_refused(tmp_path):
    d = tmp_path / "m"
    io.write_parquet(pa.table({"uid": ["a"]}), str(d / "p.parquet"))
    with pytest.raises(io.InputError, match="not a complete text-filter output"):
        run_download(DownloadConfig(), str(d), str(tmp_path / "o"))
