"""The text filter's pure batch core (no Spark): row filters, uids and URL keys (compiled
BLAKE2b and MurmurHash3 against hashlib and mmh3), control bytes, and the core without numba."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core import io
from pipeline.text_filter.config import TextFilterConfig
from tests.text_filter.helpers import (
    CLASSES,
)


def test_row_filters_in_the_pure_core():
    """filter_batch alone (no Spark): size, safety and similarity filters, counted by reason."""
    from collections import Counter

    from pipeline.text_filter.batch import filter_batch, resolve_columns
    from pipeline.text_filter.matcher import Matcher

    batch = pa.RecordBatch.from_pydict(
        {
            "URL": [f"http://a.test/{i}.jpg" for i in range(5)],
            "TEXT": ["a rose"] * 5,
            "WIDTH": [10, 500, 500, 500, None],
            "HEIGHT": [500, 500, 500, 500, 500],
            "punsafe": [0.0, 0.9, 0.0, 0.0, 0.0],
            "similarity": [0.3, 0.3, 0.1, 0.3, 0.3],
        }
    )
    cfg = TextFilterConfig(min_width=100, max_punsafe=0.5, min_similarity=0.2)
    cols = resolve_columns(batch.schema, cfg.columns, "mem")
    stats = Counter()
    out = filter_batch(batch, cols, Matcher(CLASSES), cfg, CLASSES, stats)
    assert out.column("url").to_pylist() == ["http://a.test/3.jpg"]
    assert (
        out.schema.field("label").type == pa.int32()
        and out.schema.field("width").type == pa.int64()
    )
    assert {k: stats[k] for k in ("dropped_too_small", "dropped_unsafe", "dropped_low_similarity", "rows_matched")} == {
        "dropped_too_small": 2, "dropped_unsafe": 1, "dropped_low_similarity": 1, "rows_matched": 1,
    }  # fmt: skip


def test_uids_equal_the_io_definition():
    from pipeline.text_filter.hashing import make_uids

    urls = ["http://a.test/1.jpg", None, "http://é.test/2.jpg", "", "u\x1f"]
    caps = ["a cat", "x", None, "日本", ""]
    got = make_uids(pa.array(urls, pa.string()), pa.array(caps, pa.string())).to_pylist()
    assert got == [io.make_uid(u, c) for u, c in zip(urls, caps)]


@pytest.mark.parametrize("kernel", [True, False], ids=["numba", "hashlib"])
def test_blake2b_kernel_equals_hashlib_on_every_block_boundary(kernel, monkeypatch):
    """The compiled BLAKE2b-128 (uids) gives hashlib's bytes: empty rows, every
    length around the 128-byte block, random binary (not UTF-8), nulls, slices, large types;
    and so does the hashlib fallback used where numba is missing."""
    import hashlib
    import sys

    from pipeline.text_filter.hashing import blake2b_128

    if not kernel:
        monkeypatch.setitem(sys.modules, "pipeline.text_filter.kernels", None)  # import fails
    rng = np.random.default_rng(3)
    lengths = [0, 1, 7, 8, 9, 63, 64, 127, 128, 129, 255, 256, 257, 383, 384, 385, 1000]
    rows = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in lengths]
    rows += [
        rng.integers(0, 256, rng.integers(0, 700), dtype=np.uint8).tobytes() for _ in range(300)
    ]
    want = [hashlib.blake2b(r, digest_size=16).digest() for r in rows]
    arr = pa.array(rows, pa.binary())
    assert [bytes(d) for d in blake2b_128(arr)] == want
    assert [bytes(d) for d in blake2b_128(arr.slice(5, 50))] == want[5:55]
    assert [bytes(d) for d in blake2b_128(arr.cast(pa.large_binary()))] == want
    assert [bytes(d) for d in blake2b_128(pa.chunked_array([arr[:3], arr[3:9]]))] == want[:9]
    nulls = blake2b_128(pa.array(["ab", None, ""], pa.string()))
    assert [bytes(d) for d in nulls] == [
        hashlib.blake2b(b, digest_size=16).digest() for b in (b"ab", b"", b"")
    ]
    assert blake2b_128(pa.array([], pa.binary())).shape == (0, 16)


@pytest.mark.parametrize("kernel", [True, False], ids=["numba", "numpy"])
def test_murmur3_equals_mmh3_on_every_tail_length(kernel, monkeypatch):
    """The URL keys' MurmurHash3_x64_128 gives the mmh3 package's words: every tail length
    (0-15 bytes after the 16-byte blocks) for several block counts, random binary, nulls as
    empty, slices, large types; the numpy fallback where numba is missing gives the same."""
    import sys

    mmh3 = pytest.importorskip("mmh3")
    from pipeline.text_filter.hashing import murmur3_128

    if not kernel:
        monkeypatch.setitem(sys.modules, "pipeline.text_filter.kernels", None)  # import fails
    rng = np.random.default_rng(5)
    lengths = list(range(0, 50)) + [255, 256, 257, 1000, 4099]
    rows = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in lengths]
    rows += [
        rng.integers(0, 256, rng.integers(0, 300), dtype=np.uint8).tobytes() for _ in range(200)
    ]
    want = [mmh3.hash128(r, seed=0, x64arch=True, signed=False) for r in rows]

    def words(a):
        return [(h2 << 64) | h1 for h1, h2 in murmur3_128(a).tolist()]

    arr = pa.array(rows, pa.binary())
    assert words(arr) == want
    assert words(arr.slice(7, 60)) == want[7:67]
    assert words(arr.cast(pa.large_binary())) == want
    assert words(pa.chunked_array([arr[:3], arr[3:9]])) == want[:9]
    assert words(pa.array(["http://a.test/é.jpg", None], pa.string())) == [
        mmh3.hash128("http://a.test/é.jpg".encode(), seed=0, x64arch=True, signed=False),
        0,  # null hashes as empty: MurmurHash3 of no bytes, seed 0, is 0
    ]
    assert murmur3_128(pa.array([], pa.binary())).shape == (0, 2)


def test_filter_core_runs_without_numba():
    """numba missing (a node without it): the matcher falls back to a byte engine and uids to
    hashlib, with the same rows out."""
    code = """
import sys
sys.modules["numba"] = None  # any import of numba fails
from collections import Counter
import pyarrow as pa
from pipeline.core import io
from pipeline.text_filter.matcher import Matcher
from pipeline.text_filter.batch import filter_batch, resolve_columns
from pipeline.text_filter.config import TextFilterConfig
classes = ["tabby cat", "rose"]
batch = pa.record_batch({"URL": ["http://a.test/1.jpg", "http://a.test/2.jpg", "http://a.test/3.jpg"],
                         "TEXT": ["a tabby cat", "no match", "Roses, red"]})
cfg = TextFilterConfig()
m = Matcher(classes)
out = filter_batch(batch, resolve_columns(batch.schema, cfg.columns, "x"), m, cfg, classes, Counter())
assert m.engine != "tokens", m.engine
assert out.column("label").to_pylist() == [0, 1]
assert out.column("uid").to_pylist() == [io.make_uid("http://a.test/1.jpg", "a tabby cat"),
                                         io.make_uid("http://a.test/3.jpg", "Roses, red")]
print("ok", m.engine)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok ")


def test_uid_words_are_the_uids_value_and_refuse_anything_else():
    from pipeline.text_filter.hashing import _uid_words, make_uids

    uids = make_uids(pa.array([f"http://a.test/{i}.jpg" for i in range(50)]), pa.array(["c"] * 50))
    hi, lo = _uid_words(uids.slice(7, 20))
    assert [(h << 64) | lw for h, lw in zip(hi.tolist(), lo.tolist())] == [
        int(u, 16) for u in uids.to_pylist()[7:27]
    ]
    for bad in (["A" * 32], ["g" * 32], ["0" * 31], [None]):
        with pytest.raises(ValueError):
            _uid_words(pa.array(bad, pa.string()))


def test_control_bytes_are_found_in_the_right_rows():
    from pipeline.text_filter.hashing import _has_control_bytes

    rows = [
        "http://a.test/é.jpg",
        None,
        "",
        "http://a.test/\x1f",
        "ok",
        "\x00",
        "tab\there",
        "日本",
    ]
    arr = pa.array(rows, pa.string())
    want = [False, False, False, True, False, True, True, False]
    assert _has_control_bytes(arr).tolist() == want
    assert _has_control_bytes(arr.slice(3, 4)).tolist() == want[3:7]  # an offset into buffers
    assert _has_control_bytes(pa.array([r.encode() if r else r for r in rows])).tolist() == want
    assert _has_control_bytes(pa.chunked_array([arr[:4], arr[4:]])).tolist() == want
    assert _has_control_bytes(pa.array(["clean"] * 3)).tolist() == [False] * 3
