"""Shared fixtures: a loopback image server, a loopback S3 (moto), a local Spark session,
LAION-metadata parquet in both schemas, and a tiny open_clip model config.

Everything binds 127.0.0.1. The S3 endpoint's address is put in the environment before any
test runs, so that Spark's Python workers (which inherit the driver's environment when the
JVM starts) and every s3fs/boto client find the same loopback endpoint.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_PORT = _free_port()
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
os.environ.update(
    {
        "AWS_ENDPOINT_URL": S3_ENDPOINT,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "HF_HUB_OFFLINE": "1",
        "SPARK_LOCAL_IP": "127.0.0.1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }
)


@pytest.fixture(scope="session")
def image_server():
    """A loopback HTTP server of real images (Fashion-MNIST, scikit-image) and failure modes."""
    from pipeline.demo.imageserver import ImageServer

    with ImageServer() as server:
        yield server


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1; yields its endpoint URL (also in AWS_ENDPOINT_URL)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    try:
        yield S3_ENDPOINT
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the loopback S3 endpoint; yields ``s3://<bucket>``."""
    import boto3
    import s3fs

    name = f"primer-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def spark():
    """One local[2] Spark session per test worker (starting one costs about 10 s)."""
    from pipeline.core.spark import get_spark

    session = get_spark("local[2]", app_name="primer-tests")
    yield session
    session.stop()


@pytest.fixture
def laion_parquet(tmp_path):
    """Factory: write LAION metadata parquet files; returns the directory URL.

    ``laion_parquet(n=1000, classnames=[...], schema="laion2b"|"relaion", files=2, seed=0,
    urls=None, captions=None)``.
    """
    import pyarrow.parquet as pq

    from pipeline.demo.synthetic import laion_table

    def make(
        n=1000,
        classnames=(),
        schema="laion2b",
        files=2,
        seed=0,
        urls=None,
        captions=None,
        name=None,
    ):
        out = tmp_path / (name or f"laion-{schema}-{uuid.uuid4().hex[:6]}")
        out.mkdir()
        table = laion_table(n, classnames, schema=schema, seed=seed, urls=urls, captions=captions)
        step = -(-n // files)
        for i in range(files):
            pq.write_table(table.slice(i * step, step), out / f"part-{i:05d}.parquet")
        return str(out)

    return make


@pytest.fixture(scope="session")
def tiny_model_name():
    """Register Primer's tiny open_clip config (64 px ViT, ~7M parameters); return its name."""
    from pipeline.core.torchcompat import import_open_clip

    open_clip = import_open_clip()
    open_clip.add_model_config(os.path.join(_REPO, "conf", "models"))
    return "primer-tiny-vit"


# The demo run the whole-pipeline tests share: small, but every stage has work.
DEMO_ROWS = 700


@pytest.fixture(scope="session")
def port():
    """A free loopback port for a demo's image server (part of every demo URL and uid)."""
    return _free_port()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, port, spark):
    """A finished `primer demo` run directory (one per test worker)."""
    from pipeline.demo.run import run_demo

    out = str(tmp_path_factory.mktemp("demo") / "run")
    assert run_demo(out, port=port, rows=DEMO_ROWS) == 0
    return out
