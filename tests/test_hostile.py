"""Issue 9: the hostile-input corpus not already exercised by the stage tests.

Each case here, and each listed in README.md ("What the test suite proves"), has one expected
outcome: a clear error naming the file and what is wrong, or a counted skip whose reason is
recorded. Images are served from a loopback HTTP server started here; nothing else is fetched.
"""

from __future__ import annotations

import http.server
import io as _io
import json
import os
import tarfile
import threading

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import embeddings as E
from pipeline import io
from pipeline.download import DownloadConfig, run_download
from pipeline.embed import EmbedConfig, embed_shards
from pipeline.imageserver import skimage_bytes
from pipeline.text_filter import TextFilterConfig, run_text_filter
from pipeline.urlcheck import check_url, check_urls

# ------------------------------------------------------------------------------ images


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = _io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def hostile_images() -> dict[str, bytes]:
    """Real but awkward images: CMYK JPEG, 16-bit greyscale PNG, animated GIF, 1x1, RGBA."""
    photo = Image.open(_io.BytesIO(skimage_bytes("chelsea"))).convert("RGB")
    small = photo.resize((80, 60))
    anim = _io.BytesIO()
    small.save(anim, "GIF", save_all=True, append_images=[small.rotate(90)], duration=50, loop=0)
    gray16 = Image.fromarray(np.linspace(0, 65535, 96 * 64).reshape(64, 96).astype(np.uint16))
    return {
        "cmyk.jpg": _encode(photo.convert("CMYK"), "JPEG"),
        "gray16.png": _encode(gray16, "PNG"),
        "animated.gif": anim.getvalue(),
        "one-pixel.png": _encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "rgba.png": _encode(photo.convert("RGBA"), "PNG"),
    }


IMAGES = hostile_images()


def test_hostile_images_really_are_what_they_claim():
    modes = {
        k: (Image.open(_io.BytesIO(v)).mode, Image.open(_io.BytesIO(v)).size)
        for k, v in IMAGES.items()
    }
    assert modes["cmyk.jpg"][0] == "CMYK" and modes["gray16.png"][0] == "I;16"
    assert modes["one-pixel.png"][1] == (1, 1) and modes["rgba.png"][0] == "RGBA"
    assert Image.open(_io.BytesIO(IMAGES["animated.gif"])).n_frames == 2


@pytest.fixture(scope="module")
def file_server():
    """Loopback HTTP server for IMAGES (127.0.0.1, ephemeral port)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = IMAGES.get(self.path.lstrip("/"))
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/" + self.path.rsplit(".", 1)[1])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


def test_awkward_images_download_as_rgb_jpegs(tmp_path, file_server):
    """CMYK, 16-bit, animated, 1x1 and RGBA images all become JPEG samples (RGB, or 8-bit
    greyscale for the greyscale source; the embedder converts to RGB) with short side =
    image_size; none is lost or crashes a worker."""
    urls = [f"{file_server}/{name}" for name in IMAGES]
    t = pa.table(
        {
            "uid": [io.make_uid(u, "c") for u in urls],
            "url": urls,
            "caption": ["c"] * len(urls),
            "label": pa.array([0] * len(urls), pa.int32()),
            "class_name": ["a"] * len(urls),
            "matched_term": ["a"] * len(urls),
        }
    )
    matches = str(tmp_path / "m")
    io.write_parquet(t, io.join(matches, "part-00000.parquet"))
    io.mark_done(matches)
    cfg = DownloadConfig(
        processes=1, threads=8, timeout=5, retries=0, image_size=64, samples_per_shard=8,
        allow_private_addresses=True,
    )  # fmt: skip
    stats = run_download(cfg, matches, str(tmp_path / "s"))
    manifest = {r["url"].rsplit("/", 1)[1]: r for r in io.read_parquet(
        io.join(str(tmp_path / "s"), "manifest.parquet")).to_pylist()}  # fmt: skip
    assert stats["success"] == len(IMAGES), {k: r["error_message"] for k, r in manifest.items()}
    with tarfile.open(tmp_path / "s" / "00000.tar") as tf:
        jpgs = [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")]
    assert len(jpgs) == len(IMAGES)
    for data in jpgs:
        img = Image.open(_io.BytesIO(data))
        assert img.format == "JPEG" and img.mode in ("RGB", "L") and min(img.size) == 64


def test_awkward_images_embed_from_raw_shards(tmp_path, tiny_model_name):
    """The embedding stage decodes the same images straight from a tar (not re-encoded by the
    download stage) into unit vectors; a member whose bytes are not an image is counted."""
    d = tmp_path / "raw"
    d.mkdir()
    with tarfile.open(d / "00000.tar", "w") as tf:
        members = []
        for i, (name, data) in enumerate(IMAGES.items()):
            ext = (
                name.rsplit(".", 1)[1].replace("gif", "png")
                if name.endswith(".gif")
                else name.rsplit(".", 1)[1]
            )
            members += [
                (f"{i:04d}.{ext}", data),
                (f"{i:04d}.json", json.dumps({"uid": name, "label": 0}).encode()),
            ]
        members += [
            ("9999.jpg", b"GIF89a but not really"),
            ("9999.json", b'{"uid": "fake", "label": 0}'),
        ]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, _io.BytesIO(data))
    cfg = EmbedConfig(
        model=tiny_model_name, pretrained="none", device="cpu", batch_size=4, workers=0
    )
    stats = embed_shards(cfg, str(d), str(tmp_path / "emb"))
    uids, _, feats = E.load(str(tmp_path / "emb"))
    assert sorted(uids) == sorted(IMAGES) and stats["failed"] == 1
    assert [u for _, u, _ in stats["failures"]] == ["fake"]
    assert np.isfinite(feats.astype(np.float32)).all()
    np.testing.assert_allclose(np.linalg.norm(feats.astype(np.float32), axis=1), 1.0, atol=2e-3)


# ------------------------------------------------------------------------------ metadata


@pytest.fixture
def dataset_yaml(tmp_path):
    p = tmp_path / "d.yaml"
    p.write_text("name: D\nclasses: [tabby cat, rose]\ntemplates: ['a photo of a {}.']\n")
    return str(p)


def _filter(tmp_path, dataset_yaml, tables: dict[str, pa.Table], **cfg):
    d = tmp_path / "in"
    d.mkdir(exist_ok=True)
    for name, t in tables.items():
        pq.write_table(t, d / name)
    out = str(tmp_path / "out")
    stats = run_text_filter(TextFilterConfig(**cfg), dataset_yaml, str(d), out)
    return stats, ds.dataset(out).to_table().to_pylist()


def test_zero_row_file_is_scanned_and_empty(tmp_path, dataset_yaml, spark):
    empty = pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())})
    one = pa.table({"url": ["http://a.test/1.jpg"], "caption": ["a tabby cat"]})
    stats, rows = _filter(tmp_path, dataset_yaml, {"a.parquet": empty, "b.parquet": one})
    assert stats["rows_scanned"] == 1 and [r["class_name"] for r in rows] == ["tabby cat"]


def test_null_and_empty_captions_are_counted_not_errors(tmp_path, dataset_yaml, spark):
    t = pa.table(
        {
            "url": [f"http://a.test/{i}.jpg" for i in range(4)],
            "caption": pa.array([None, "", "   ", "rose garden"], pa.string()),
        }
    )
    stats, rows = _filter(tmp_path, dataset_yaml, {"a.parquet": t})
    assert stats["rows_scanned"] == 4 and [r["url"] for r in rows] == ["http://a.test/3.jpg"]
    # Null and "" are counted as such; whitespace only names no class (no_match).
    assert stats["dropped"]["null_or_empty_caption"] == 2, stats["dropped"]
    assert stats["dropped"]["no_match"] == 1


def test_wrong_column_type_fails_naming_file_and_column(tmp_path, dataset_yaml, spark):
    t = pa.table({"url": ["http://a.test/1.jpg"], "caption": pa.array([3], pa.int64())})
    with pytest.raises(io.InputError, match=r"a\.parquet.*caption|caption.*a\.parquet"):
        _filter(tmp_path, dataset_yaml, {"a.parquet": t})
    assert not io.is_done(str(tmp_path / "out"))


def test_url_column_of_wrong_type_fails_naming_it(tmp_path, dataset_yaml, spark):
    t = pa.table({"url": pa.array([1.5]), "caption": ["tabby cat"]})
    with pytest.raises(io.InputError, match=r"a\.parquet.*url|url.*a\.parquet"):
        _filter(tmp_path, dataset_yaml, {"a.parquet": t})


def test_safety_column_of_wrong_type_fails_naming_it(tmp_path, dataset_yaml, spark):
    t = pa.table({"url": ["http://a.test/1.jpg"], "caption": ["tabby cat"], "punsafe": ["high"]})
    with pytest.raises(io.InputError, match=r"a\.parquet.*punsafe|punsafe.*a\.parquet"):
        _filter(tmp_path, dataset_yaml, {"a.parquet": t}, max_punsafe=0.5)


def test_not_parquet_at_all_is_skipped_when_asked(tmp_path, dataset_yaml, spark):
    d = tmp_path / "in"
    d.mkdir()
    (d / "z.parquet").write_bytes(b"<html>403 Forbidden</html>")
    one = pa.table({"url": ["http://a.test/1.jpg"], "caption": ["a tabby cat"]})
    stats, rows = _filter(tmp_path, dataset_yaml, {"b.parquet": one}, skip_bad_files=True)
    assert len(rows) == 1 and any("z.parquet" in f for f in stats["bad_files"])


# ------------------------------------------------------------------------------ URLs


@pytest.mark.parametrize(
    "url",
    [
        "http://ｌｏｃａｌｈｏｓｔ/a.jpg",  # fullwidth letters: NFKC makes them "localhost"
        "http://１２７.０.０.１/a.jpg",  # fullwidth digits
        "http://169．254．169．254/latest/meta-data/",  # fullwidth dots are label separators
        "http://①②⑦.0.0.1/a.jpg",  # circled digits
    ],
)
def test_idn_spellings_of_internal_hosts_are_refused(url):
    """Resolvers see a host's IDNA form; the pre-check judges that form (no network here)."""
    assert check_url(url) == "refused_address"
    assert check_urls([url]) == ["refused_address"]


def test_real_idn_hostnames_pass_and_invalid_ones_are_invalid():
    assert check_url("http://bücher.example/a.jpg") is None
    assert check_url("http://xn--bcher-kva.example/a.jpg") is None
    assert check_url("http://\u200b.example/a.jpg") == "invalid_url"


# ------------------------------------------------------------------------------ S3 outage


@pytest.mark.parametrize("fail_at", [1, 4, 6])
def test_s3_failing_part_way_then_rerun_completes(
    tmp_path, s3_bucket, tiny_model_name, monkeypatch, fail_at
):
    """The object store starts failing after ``fail_at`` uploads while the embedding stage
    writes three shards to S3: the stage fails with the store's error, no ``_SUCCESS`` appears,
    every shard already marked done is whole, and a rerun (store back) completes with exactly
    the rows and features of a clean local run."""
    import s3fs

    from tests.test_embed import make_shards

    shards = str(tmp_path / "shards")
    make_shards(shards, n_shards=3, per=5, bad=False)
    cfg = EmbedConfig(
        model=tiny_model_name, pretrained="none", device="cpu", batch_size=4, workers=0
    )
    clean = str(tmp_path / "clean")
    embed_shards(cfg, shards, clean)

    uploads = []
    real_put = s3fs.S3FileSystem._put_file

    async def flaky_put(self, lpath, rpath, *args, **kwargs):
        uploads.append(rpath)
        if len(uploads) > fail_at:
            raise OSError(f"injected S3 outage at upload {len(uploads)} ({rpath})")
        return await real_put(self, lpath, rpath, *args, **kwargs)

    out = io.join(s3_bucket, "emb")
    # fsspec binds each instance's sync methods when it is created, and caches instances:
    # drop the cache whenever the patch changes so the next filesystem sees it.
    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", flaky_put)
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(Exception, match="injected S3 outage"):
        embed_shards(cfg, shards, out)
    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", real_put)
    s3fs.S3FileSystem.clear_instance_cache()
    assert len(uploads) == fail_at + 1  # the run stopped at the first failed upload

    assert not io.is_done(out)
    fs, _ = io.url_to_fs(out)
    names = (
        {os.path.basename(p) for p in fs.ls(out.replace("s3://", ""), detail=False)}
        if fs.exists(out)
        else set()
    )
    for done in sorted(n for n in names if n.endswith(".done")):
        stem = done[: -len(".done")]
        assert {f"{stem}.npy", f"{stem}.parquet"} <= names, names  # data before its marker
        feats = np.load(_io.BytesIO(io.read_bytes(io.join(out, f"{stem}.npy"))))
        assert feats.shape[0] == io.read_parquet(io.join(out, f"{stem}.parquet")).num_rows
    with pytest.raises(io.InputError, match="not a complete embedding output"):
        E.load(out)  # incomplete output is refused by readers, not half-read

    embed_shards(cfg, shards, out)
    u1, y1, f1 = E.load(clean)
    u2, y2, f2 = E.load(out)
    assert list(u1) == list(u2) and (y1 == y2).all() and np.array_equal(f1, f2)
