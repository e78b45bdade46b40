"""Synthetic embedding folders in the exact LAION / clip-retrieval layout
(``img_emb/img_emb_<i>.npy`` beside ``metadata/metadata_<i>.parquet``), for the tests and
bench/precomputed.py."""

from __future__ import annotations

import io as _io

import numpy as np
import pyarrow as pa

from pipeline.core import io
from pipeline.demo.synthetic import make_captions


def npy_bytes(x: np.ndarray) -> bytes:
    buf = _io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def clustered(rng: np.random.Generator, n: int, dim: int, centers: np.ndarray) -> np.ndarray:
    """``n`` float32 unit rows around ``centers`` (CLIP features are clustered, not uniform)."""
    x = centers[rng.integers(0, len(centers), n)] + rng.standard_normal((n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_folder(
    root: str,
    sizes=(300, 500, 200),
    dim: int = 16,
    dtypes=("float16", "float32"),
    seed: int = 0,
    digits: int = 4,
    names: list[int] | None = None,
    centers: int = 0,
    row_group_size: int | None = None,
    classnames: tuple[str, ...] = (),
) -> dict:
    """Write a folder of ``len(sizes)`` file pairs under ``root`` (local path or ``s3://``).

    File ``j`` holds ``sizes[j]`` rows of dtype ``dtypes[j % len(dtypes)]``, numbered
    ``names[j]`` (default ``j``) with ``digits`` leading zeros; metadata columns url, caption,
    similarity. ``centers`` > 0 draws clustered rows; ``classnames``: a fifth of the captions
    name one (:func:`pipeline.demo.synthetic.make_captions`). Returns ``{"vectors": float32 rows as stored (not normalised), "urls",
    "captions", "emb": [npy URLs], "meta": [parquet URLs]}`` in folder order.
    """
    rng = np.random.default_rng(seed)
    names = list(range(len(sizes))) if names is None else names
    c = rng.standard_normal((centers, dim)) if centers else None
    vectors, urls, caps, embs, metas = [], [], [], [], []
    for j, (num, n) in enumerate(zip(names, sizes)):
        dt = dtypes[j % len(dtypes)]
        x = clustered(rng, n, dim, c) if c is not None else rng.standard_normal((n, dim))
        x = x.astype(dt)
        tag = str(num).zfill(digits)
        emb = io.join(root, "img_emb", f"img_emb_{tag}.npy")
        meta = io.join(root, "metadata", f"metadata_{tag}.parquet")
        io.write_bytes(emb, npy_bytes(x))
        u = [f"http://img.test/{num}/{r}.jpg" for r in range(n)]
        if classnames:
            cap = make_captions(n, classnames, 0.2, seed + num)[0]
        else:
            cap = [f"photo {r} of file {num}" for r in range(n)]
        table = pa.table({"url": u, "caption": cap, "similarity": rng.uniform(0.2, 0.4, n)})
        if row_group_size:
            import pyarrow.parquet as pq

            with io.atomic_open(meta) as f:
                pq.write_table(table, f, row_group_size=row_group_size)
        else:
            io.write_parquet(table, meta)
        vectors.append(x.astype(np.float32))
        urls += u
        caps += cap
        embs.append(emb)
        metas.append(meta)
    return {
        "vectors": np.concatenate(vectors),
        "urls": urls,
        "captions": caps,
        "emb": embs,
        "meta": metas,
    }


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
