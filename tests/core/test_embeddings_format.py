"""The shared embedding/decision format round-trips (local and S3)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core import embeddings as E
from pipeline.core import io


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_shards_round_trip_in_shard_order(tmp_path, request, where):
    base = (
        str(tmp_path / "emb")
        if where == "local"
        else io.join(request.getfixturevalue("s3_bucket"), "emb")
    )
    rng = np.random.default_rng(0)
    f1, f0 = _unit(rng, 3, 8), _unit(rng, 2, 8)
    E.write_shard(base, "00001", ["c", "d", "e"], [2, 0, 1], f1)
    E.write_shard(base, "00000", ["a", "b"], [1, 1], f0)
    io.write_json(io.join(base, E.META), {"embed_dim": 8})
    with pytest.raises(io.InputError, match="not a complete embedding"):
        E.load(base)
    io.mark_done(base)
    uids, labels, feats = E.load(base)
    assert list(uids) == ["a", "b", "c", "d", "e"]
    assert labels.tolist() == [1, 1, 2, 0, 1] and labels.dtype == np.int64
    assert feats.dtype == np.float16 and feats.shape == (5, 8)
    np.testing.assert_allclose(feats.astype(np.float32), np.vstack([f0, f1]), atol=2e-3)


def test_write_shard_rejects_unnormalised(tmp_path):
    with pytest.raises(ValueError, match="normalised"):
        E.write_shard(str(tmp_path), "00000", ["a"], [0], np.ones((1, 4)))


def test_decision_loads_kept_pool_rows(tmp_path):
    rng = np.random.default_rng(1)
    pool = str(tmp_path / "pool")
    E.write_shard(pool, "00000", ["a", "b", "c"], [0, 1, 0], _unit(rng, 3, 4))
    io.mark_done(pool)
    dec = str(tmp_path / "dec")
    table = pa.table(
        {
            "uid": ["a", "b", "c"],
            "label": [0, 1, 0],
            "score": [0.9, 0.1, 0.8],
            "kept": [True, False, True],
            "reason": ["kept", "low_prob", "kept"],
        }
    )
    E.write_decision(dec, table, {"pool": pool}, {"kept": 2})
    uids, labels, _ = E.load(dec)
    assert list(uids) == ["a", "c"] and labels.tolist() == [0, 0]


def test_class_means_matches_formula_and_empty_class_is_zero():
    rng = np.random.default_rng(2)
    f = _unit(rng, 6, 5)
    labels = np.array([0, 0, 2, 2, 2, 0])
    m = E.class_means(f, labels, 4)
    expect0 = f[[0, 1, 5]].sum(0)
    np.testing.assert_allclose(m[0], expect0 / np.linalg.norm(expect0), atol=1e-6)
    assert not m[1].any() and not m[3].any()
