"""Issue 9: the object store failing part way through the embedding stage's S3 writes, then
coming back: no half-written output is trusted, and the rerun equals a clean run."""

from __future__ import annotations

import io as _io
import os

import numpy as np
import pytest

from pipeline.core import embeddings as E
from pipeline.core import io


@pytest.mark.parametrize("fail_at", [1, 4, 6])
def test_s3_failing_part_way_then_rerun_completes(
    tmp_path, s3_bucket, tiny_model_name, monkeypatch, fail_at
):
    """The object store starts failing after ``fail_at`` uploads while the embedding stage
    writes three shards to S3: the stage fails with the store's error, no ``_SUCCESS`` appears,
    every shard already marked done is whole, and a rerun (store back) completes with exactly
    the rows and features of a clean local run."""
    import s3fs

    from pipeline.embed.config import EmbedConfig
    from pipeline.embed.pool import embed_shards
    from tests.embed.test_embed import make_shards

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
