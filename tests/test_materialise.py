"""Issue 6: materialise a decision as webdataset shards or an ImageFolder, locally and on S3."""

from __future__ import annotations

import io as _io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.app.cli import main
from pipeline.core import embeddings as E
from pipeline.core import io
from pipeline.demo.imageserver import fashion_mnist_bytes
from pipeline.materialise import run_materialise, safe_name

CLASSES = ["T-shirt/top", "Ankle boot", "Crème brûlée"]
N = 9


def _member(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, _io.BytesIO(data))


def _sample(tf, key, i, meta=None, image=True):
    meta = (
        meta
        if meta is not None
        else {"uid": f"u{i}", "label": i % 3, "class_name": CLASSES[i % 3], "url": f"http://x/{i}"}
    )
    if image:
        _member(tf, f"{key}.jpg", fashion_mnist_bytes("train", i))
    _member(tf, f"{key}.txt", f"cap {i}".encode())
    _member(tf, f"{key}.json", meta if isinstance(meta, bytes) else json.dumps(meta).encode())


@pytest.fixture
def inputs(tmp_path):
    """Two download-like shards of real Fashion-MNIST JPEGs plus hostile and broken members,
    and a decision keeping u0, u2, u3, u5, u7, u8 (u8 has no image)."""
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tf:
        for i in range(5):
            _sample(tf, f"{i:09d}", i)
        _member(tf, "../../escape.jpg", b"x")  # path traversal attempt
        _member(tf, "/etc/evil.json", b"{}")
        _sample(tf, "000000100", 100, meta=b"not json")
    with tarfile.open(shards / "00001.tar", "w") as tf:
        for i in range(5, 8):
            _sample(tf, f"{i:09d}", i)
        _sample(tf, "000000200", 3)  # u3 again: a duplicate
        _sample(tf, "000000300", 300, meta={"uid": "u8", "label": 2}, image=False)  # no image
    dec = str(tmp_path / "dec")
    kept = [i in (0, 2, 3, 5, 7, 8) for i in range(N)]
    table = pa.table(
        {
            "uid": [f"u{i}" for i in range(N)],
            "label": pa.array([i % 3 for i in range(N)], pa.int32()),
            "score": pa.array(np.linspace(0.1, 0.9, N), pa.float32()),
            "kept": kept,
            "reason": ["kept" if k else "not_in_topk" for k in kept],
        }
    )
    E.write_decision(dec, table, {"pool": "unused", "filter": "test"}, {})
    return str(shards), dec


def test_webdataset_reads_back_and_is_byte_identical(tmp_path, inputs):
    import webdataset as wds

    shards, dec = inputs
    out = str(tmp_path / "wd")
    s = run_materialise(dec, shards, out, "webdataset", samples_per_shard=3)
    assert s["written"] == 5 and s["missing_from_shards"] == 1
    assert s["skipped"] == {"bad_json": 1, "duplicate": 1, "no_image": 1}
    assert sorted(f for f in os.listdir(out) if f.endswith(".tar")) == ["00000.tar", "00001.tar"]
    got = {}
    for x in wds.WebDataset(os.path.join(out, "{00000..00001}.tar"), shardshuffle=False).decode(
        "pil"
    ):
        meta = x["json"]
        got[meta["uid"]] = (meta["label"], x["txt"], x["jpg"].size)
        assert x["__key__"] == meta["uid"]
    assert got == {f"u{i}": (i % 3, f"cap {i}", (64, 64)) for i in (0, 2, 3, 5, 7)}
    manifest = io.read_parquet(io.join(out, "manifest.parquet"))
    assert manifest.column_names[:6] == ["uid", "label", "class_name", "caption", "score", "reason"]
    assert manifest.column("uid").to_pylist() == ["u0", "u2", "u3", "u5", "u7"]
    assert manifest.column("class_name").to_pylist()[0] == "T-shirt/top"
    assert io.is_done(out)
    again = str(tmp_path / "wd2")
    run_materialise(dec, shards, again, "webdataset", samples_per_shard=3)
    for name in ("00000.tar", "00001.tar", "manifest.parquet"):
        assert (
            open(os.path.join(out, name), "rb").read()
            == open(os.path.join(again, name), "rb").read()
        )
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path.parent / "escape.jpg").exists()


def test_imagefolder_reads_back_with_the_right_class_folders(tmp_path, inputs):
    from pipeline.core.torchcompat import ensure_torchvision

    ensure_torchvision()
    from torchvision.datasets import ImageFolder

    shards, dec = inputs
    out = str(tmp_path / "imf")
    run_materialise(dec, shards, out, "imagefolder")
    folders = sorted(e.name for e in os.scandir(out) if e.is_dir())
    assert folders == ["0000_T-shirt_top", "0001_Ankle_boot", "0002_Creme_brulee"]
    ds = ImageFolder(out)
    # Folder names start with the zero-padded label, so ImageFolder's sorted class index is the label.
    assert ds.classes == folders
    assert sorted((os.path.basename(p), y) for p, y in ds.samples) == sorted(
        (f"u{i}.jpg", i % 3) for i in (0, 2, 3, 5, 7)
    )
    img, y = ds[0]
    assert img.size == (64, 64)
    with Image.open(os.path.join(out, "0000_T-shirt_top", "u0.jpg")) as im:
        assert im.format == "JPEG"
    manifest = io.read_parquet(io.join(out, "manifest.parquet")).to_pylist()
    assert {r["uid"]: r["path"] for r in manifest}["u5"] == "0002_Creme_brulee/u5.jpg"
    assert not any(
        name.startswith(".") for _, _, files in os.walk(out) for name in files
    )  # no temp files left


def test_safe_name_never_escapes():
    for name in ("../..", "/etc/passwd", "a/b\\c", "", "...", "x" * 500, "Crème brûlée"):
        s = safe_name(name)
        assert s and "/" not in s and "\\" not in s and not s.startswith(".") and len(s) <= 80


def test_pool_embeddings_as_decision_keep_everything(tmp_path, inputs):
    shards, _ = inputs
    pool = str(tmp_path / "pool")
    uids = [f"u{i}" for i in range(4)]
    E.write_shard(pool, "00000", uids, [0, 1, 2, 0], np.eye(4, dtype=np.float32))
    io.write_json(io.join(pool, E.META), {"embed_dim": 4})
    io.mark_done(pool)
    s = run_materialise(pool, shards, str(tmp_path / "all"), "webdataset")
    assert s["written"] == 4
    reasons = (
        io.read_parquet(str(tmp_path / "all" / "manifest.parquet")).column("reason").to_pylist()
    )
    assert reasons == ["pool"] * 4
    with pytest.raises(io.InputError, match="neither"):
        run_materialise(str(tmp_path / "nothing"), shards, str(tmp_path / "x"))


def test_cli_rerun_skips_and_s3_round_trip(tmp_path, inputs, s3_bucket, capsys):
    shards, dec = inputs
    fs, _ = io.url_to_fs(s3_bucket)
    fs.put(shards, f"{s3_bucket}/shards", recursive=True)
    fs.put(dec, f"{s3_bucket}/dec", recursive=True)
    out = io.join(s3_bucket, "subset")
    argv = [
        "materialise",
        "--decision",
        io.join(s3_bucket, "dec"),
        "--shards",
        io.join(s3_bucket, "shards"),
        "--out",
        out,
        "--format",
        "imagefolder",
    ]
    assert main(argv) == 0
    assert "5 images" in capsys.readouterr().out
    assert io.is_done(out)
    assert io.read_bytes(io.join(out, "0001_Ankle_boot", "u7.jpg")) == fashion_mnist_bytes(
        "train", 7
    )
    before = io.read_bytes(io.join(out, io.SUCCESS))
    assert main(argv) == 0 and io.read_bytes(io.join(out, io.SUCCESS)) == before  # skipped
    local = str(tmp_path / "wd")
    assert (
        main(
            [
                "materialise",
                "--decision",
                io.join(s3_bucket, "dec"),
                "--shards",
                io.join(s3_bucket, "shards"),
                "--out",
                local,
                "--set",
                "materialise.samples_per_shard=2",
            ]
        )
        == 0
    )
    assert sorted(f for f in os.listdir(local) if f.endswith(".tar")) == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
    ]
    assert (
        main(
            [
                "materialise",
                "--decision",
                dec,
                "--shards",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path / "z"),
            ]
        )
        == 2
    )
