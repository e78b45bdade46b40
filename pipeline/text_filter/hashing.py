"""Row hashes of the text filter, vectorised over Arrow arrays: BLAKE2b-128 uids, MurmurHash3-128
URL keys, and the seeded sampling hash of the per-class cap. numba's kernels where numba
imports (:mod:`pipeline.text_filter.kernels`), the same values from hashlib or numpy otherwise.
"""

from __future__ import annotations

import binascii
import hashlib
import importlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def make_uids(urls: pa.Array, captions: pa.Array) -> pa.Array:
    """:func:`pipeline.core.io.make_uids` (BLAKE2b-128 of url, 0x1F, caption; nulls as empty), the
    same strings without a Python object per row: the fields are joined in Arrow and hashed by
    a compiled kernel (:func:`blake2b_128`)."""
    return _hex_strings(_uid_digests(urls, captions))


def _uid_digests(urls: pa.Array, captions: pa.Array) -> np.ndarray:
    """The 16 bytes of each row's uid (``uint8 [rows, 16]``), before hex."""
    joined = pc.binary_join_element_wise(urls.fill_null(""), captions.fill_null(""), "\x1f")
    return blake2b_128(joined)


def _kernels():
    """:mod:`pipeline.text_filter.kernels` (numba's compiled loops), or None where numba is missing."""
    try:
        return importlib.import_module("pipeline.text_filter.kernels")
    except ImportError:
        return None


def _row_bytes(arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, values)`` of the rows of a string or binary array to hash, nulls as empty
    (see :func:`pipeline.text_filter.matcher._buffers`)."""
    from pipeline.text_filter.matcher import _buffers

    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if not len(arr):  # an empty array may have no buffers at all
        return np.zeros(1, np.int64), np.zeros(0, np.uint8)
    arr = arr.fill_null("" if pa.types.is_string(arr.type) else b"")
    if pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type):
        arr = arr.cast(pa.binary())  # int32 offsets; text-filter batches stay far under 2 GB
    return _buffers(arr)


def _has_control_bytes(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Per row of a string or binary array: whether it holds a C0 control byte or DEL
    (0x00-0x1F, 0x7F; never part of a UTF-8 multi-byte character). Such rows are rare: one
    pass over the whole buffer first, and rows are located only where it finds one."""
    offsets, values = _row_bytes(arr)
    bad = np.zeros(len(offsets) - 1, dtype=bool)
    if not len(values) or (values.min() >= 0x20 and not (values == 0x7F).any()):
        return bad
    pos = np.flatnonzero((values < 0x20) | (values == 0x7F))
    bad[np.searchsorted(offsets, pos, side="right") - 1] = True
    return bad


def blake2b_128(arr: pa.Array) -> np.ndarray:
    """BLAKE2b with a 16-byte digest of each row of a string or binary array (nulls hash as
    empty): ``uint8 [rows, 16]``. numba's kernel where numba imports, else hashlib per row (the
    same bytes, slower: bench/hashing.py)."""
    offsets, values = _row_bytes(arr)
    out = np.zeros((len(offsets) - 1, 16), dtype=np.uint8)
    if not len(out):
        return out
    kernels = _kernels()
    if kernels is None:
        digest, bounds = hashlib.blake2b, zip(offsets[:-1].tolist(), offsets[1:].tolist())
        joined = b"".join(
            [digest(values[a:b].tobytes(), digest_size=16).digest() for a, b in bounds]
        )
        return np.frombuffer(joined, dtype=np.uint8).reshape(-1, 16)
    kernels.blake2b_128(values, offsets, kernels.BLAKE2B_IV, out)
    return out


def murmur3_128(arr: pa.Array) -> np.ndarray:
    """MurmurHash3_x64_128 (seed 0) of each row of a string or binary array (nulls hash as
    empty): ``uint64 [rows, 2]``, the words (h1, h2) that ``mmh3.hash128`` joins into
    ``h2 << 64 | h1``. numba's kernel where numba imports, else the same words from numpy
    vectorised over rows (:func:`_murmur3_128_numpy`)."""
    offsets, values = _row_bytes(arr)
    kernels = _kernels()
    if kernels is None:
        return _murmur3_128_numpy(values, offsets)
    out = np.zeros((len(offsets) - 1, 2), dtype=np.uint64)
    kernels.murmur3_128(values, offsets, out)
    return out


def _murmur3_128_numpy(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """:func:`murmur3_128` without numba: block ``j`` of every row at once, for the rows that
    have one (a loop as long as the longest row's blocks, each step over the rows left)."""
    u = np.uint64
    m1, m2 = u(0x87C37B91114253D5), u(0x4CF5AD432745937F)

    def rotl(x, r):
        return (x << u(r)) | (x >> u(64 - r))

    def fmix(k):
        k = k ^ (k >> u(33))
        k = k * u(0xFF51AFD7ED558CCD)
        k = k ^ (k >> u(33))
        k = k * u(0xC4CEB9FE1A85EC53)
        return k ^ (k >> u(33))

    start, length = offsets[:-1], np.diff(offsets)
    n = len(length)
    h1, h2 = np.zeros(n, u), np.zeros(n, u)
    blocks = length // 16
    padded = np.concatenate([values, np.zeros(16, np.uint8)])  # tails read past the end
    lanes = np.arange(16)
    with np.errstate(over="ignore"):
        for j in range(int(blocks.max(initial=0))):
            sel = np.flatnonzero(blocks > j)
            k = padded[(start[sel] + 16 * j)[:, None] + lanes].view("<u8").astype(u)
            a = h1[sel] ^ (rotl(k[:, 0] * m1, 31) * m2)
            a = (rotl(a, 27) + h2[sel]) * u(5) + u(0x52DCE729)
            b = h2[sel] ^ (rotl(k[:, 1] * m2, 33) * m1)
            b = (rotl(b, 31) + a) * u(5) + u(0x38495AB5)
            h1[sel], h2[sel] = a, b
        rem = length & 15
        tail = padded[(start + 16 * blocks)[:, None] + lanes]
        tail = np.where(lanes < rem[:, None], tail, 0).astype(np.uint8).view("<u8").astype(u)
        h2 ^= np.where(rem > 8, rotl(tail[:, 1] * m2, 33) * m1, u(0))
        h1 ^= np.where(rem > 0, rotl(tail[:, 0] * m1, 31) * m2, u(0))
        h1 ^= length.astype(u)
        h2 ^= length.astype(u)
        h1 += h2
        h2 += h1
        h1, h2 = fmix(h1), fmix(h2)
        h1 += h2
        h2 += h1
    return np.stack([h1, h2], axis=1)


def _hex_strings(digests: np.ndarray) -> pa.Array:
    """Lower-case hex strings of ``uint8 [rows, k]`` (2k digits each), built in numpy."""
    n, k = digests.shape
    hexed = _HEX_PAIRS[digests]
    offsets = np.arange(0, 2 * k * n + 1, 2 * k, dtype=np.int32)
    return pa.Array.from_buffers(
        pa.string(),
        n,
        [None, pa.py_buffer(offsets), pa.py_buffer(hexed)],  # no copy
    )


def cap_hash(uids: pa.Array | pa.ChunkedArray | list[str], seed: int) -> np.ndarray:
    """Seeded 64-bit hash of each uid (32 hex digits): the sampling order of the per-class cap.

    The uid is already a uniform BLAKE2b digest, so its first 64 bits mixed with the seed by
    splitmix64 give an independent pseudo-random order per seed, vectorised. Raises
    ``ValueError`` for anything but 32 lower-case hex digits.
    """
    if isinstance(uids, list):
        uids = pa.array(uids, pa.string())
    return _cap_hash_words(_uid_words(uids)[0], seed)


def _cap_hash_words(uid_hi: np.ndarray, seed: int) -> np.ndarray:
    """:func:`cap_hash` from the high word of each uid (its first 16 hex digits)."""
    return _splitmix64(uid_hi ^ _splitmix64(np.array([seed % 2**64], dtype=np.uint64))[0])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _uid_words(uids: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The 128-bit value of each uid (32 lower-case hex digits) as (high, low) uint64 words;
    their order is the uids' string order. Raises ``ValueError`` for any other uid."""
    arr = uids.combine_chunks() if isinstance(uids, pa.ChunkedArray) else uids
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    if arr.null_count or not pa.types.is_string(arr.type):
        raise ValueError("uids must be 32 hex digits")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + n + 1]
    if not (np.diff(offsets) == 32).all():
        raise ValueError("uids must be 32 hex digits")
    digits = arr.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0])).to_pybytes()
    # Lower case only (binascii takes upper case too, whose string order differs).
    if digits.translate(None, b"0123456789abcdef"):
        raise ValueError("uids must be 32 hex digits")
    # The 16 bytes of each uid, big-endian.
    words = np.frombuffer(binascii.unhexlify(digits), dtype=">u8").reshape(n, 2)
    return words[:, 0].astype(np.uint64), words[:, 1].astype(np.uint64)


_HEX_PAIRS = np.frombuffer(b"".join(b"%02x" % i for i in range(256)), dtype=np.uint16)
