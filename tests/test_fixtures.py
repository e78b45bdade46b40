"""The shared fixtures work: if one breaks, these fail before the stage tests do."""

from __future__ import annotations

import io as _io
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core import io
from pipeline.demo.imageserver import FASHION_CLASSES, load_fashion_mnist
from pipeline.demo.synthetic import laion_table, make_captions


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers, r.read()


def test_image_server_serves_real_decodable_images(image_server):
    status, headers, body = _get(image_server.url("fmnist/train/0.jpg"))
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    img = Image.open(_io.BytesIO(body))
    img.load()
    assert img.size == (64, 64) and img.mode == "RGB"
    # The pixels are Fashion-MNIST's: the upscaled image correlates with the 28x28 original.
    images, labels = load_fashion_mnist("train")
    small = np.asarray(img.convert("L").resize((28, 28)), dtype=np.float64)
    assert np.corrcoef(small.ravel(), images[0].astype(np.float64).ravel())[0, 1] > 0.9
    assert labels[0] in range(len(FASHION_CLASSES))
    _, _, png = _get(image_server.url("skimage/chelsea.png"))
    photo = Image.open(_io.BytesIO(png))
    assert photo.format == "PNG" and photo.size == (451, 300)


def test_image_server_failure_modes(image_server):
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(image_server.url("status/404"))
    assert e.value.code == 404
    _, headers, body = _get(image_server.url("notimage/x.jpg"))
    assert headers["Content-Type"] == "text/html" and b"<html>" in body
    _, _, truncated = _get(image_server.url("truncated/skimage/coffee.jpg"))
    _, _, full = _get(image_server.url("skimage/coffee.jpg"))
    assert len(truncated) == len(full) // 2
    with pytest.raises(OSError):
        Image.open(_io.BytesIO(truncated)).load()
    _, headers, _ = _get(image_server.url("noai/fmnist/test/3.jpg"))
    assert "noai" in headers["X-Robots-Tag"]
    with pytest.raises(TimeoutError):
        _get(image_server.url("slow/2/fmnist/train/1.jpg"), timeout=0.3)
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        _get(image_server.url("reset/x"))
    _, _, bomb = _get(image_server.url("bomb.png"))
    assert len(bomb) < 2_000_000
    # It really is a bomb: Pillow's own guard refuses to open it.
    with pytest.raises(Image.DecompressionBombError):
        Image.open(_io.BytesIO(bomb))


def test_laion_tables_both_schemas():
    t1 = laion_table(500, ["golden retriever", "tabby cat"], schema="laion2b", seed=3)
    t2 = laion_table(500, ["golden retriever", "tabby cat"], schema="relaion", seed=3)
    assert {"URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark"} <= set(
        t1.column_names
    )
    assert {"url", "caption", "width", "height", "similarity", "punsafe", "pwatermark"} <= set(
        t2.column_names
    )
    assert t1.column("TEXT").to_pylist() == t2.column("caption").to_pylist()
    assert t1 == laion_table(500, ["golden retriever", "tabby cat"], schema="laion2b", seed=3)


def test_captions_look_like_laion():
    caps, planted = make_captions(20_000, ["golden retriever"], match_rate=0.1, seed=1)
    lengths = np.array([len(c) for c in caps])
    assert 50 < lengths.mean() < 85
    named = np.array(["golden retriever" in c.lower() for c in caps])
    assert named[planted >= 0].all()
    assert 0.07 < (planted >= 0).mean() < 0.13


def test_s3_endpoint_round_trips_parquet(s3_bucket):
    table = pa.table({"uid": ["a", "b"], "x": [1, 2]})
    url = io.join(s3_bucket, "dir", "t.parquet")
    io.write_parquet(table, url)
    assert io.exists(url)
    assert io.read_parquet(io.join(s3_bucket, "dir")) == table
    fs, path = io.url_to_fs(url)
    with fs.open(path, "rb") as f:
        assert pq.read_table(f) == table
    assert io.list_files(io.join(s3_bucket, "dir")) == [url]


def test_laion_parquet_fixture(laion_parquet):
    d = laion_parquet(n=101, classnames=["tabby cat"], files=3)
    files = io.list_files(d, suffixes=(".parquet",))
    assert len(files) == 3
    assert sum(pq.read_metadata(f).num_rows for f in files) == 101
