"""Row hashes of the text filter: its numba kernels against the libraries that could replace
them, on the rows the filter hashes (matched rows: a uid each, and a URL key each).

- uid, BLAKE2b-128 of url 0x1F caption: numba kernel vs ``hashlib.blake2b`` per row (the
  fallback where numba is missing; the same bytes);
- URL key, MurmurHash3_x64_128: numba kernel vs ``mmh3.hash128`` per row vs ``xxhash``'s
  XXH3-128 per row (another well-mixed 128-bit hash).

Every row prints its time for the matched rows of a 2M-caption scan (18% of captions match),
so it reads against `primer filter`'s end-to-end time on the same 2M (docs/benchmarks.md).

    python bench/hashing.py [--rows 360000] [--record]
"""

from __future__ import annotations

import argparse
import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from _util import add_record_flag, record, table, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=360_000, help="matched rows (default: 2M x 18%)")
    add_record_flag(ap)
    ap.add_argument(
        "--quick", action="store_true", help="a small run (seconds to a minute) for make bench"
    )
    args = ap.parse_args()
    if args.quick:
        args.rows = min(args.rows, 50_000)
    from pipeline.demo.synthetic import laion_table
    from pipeline.text_filter import hashing

    t = laion_table(args.rows, schema="relaion", seed=0)
    urls, caps = t.column("url").combine_chunks(), t.column("caption").combine_chunks()
    joined = pc.binary_join_element_wise(urls, caps, "\x1f")
    hashing.blake2b_128(joined[:10])  # numba's compile or cache load, not timed
    hashing.murmur3_128(urls[:10])
    res: dict = {}
    for _ in range(3):  # best of three
        r: dict = {}
        with timed(r, "uid numba"):
            a = hashing.blake2b_128(joined)
        with timed(r, "uid hashlib"):
            b = [hashlib.blake2b(x, digest_size=16).digest() for x in _bytes(joined)]
        with timed(r, "url numba"):
            u = hashing.murmur3_128(urls)
        import mmh3

        with timed(r, "url mmh3"):
            m = [mmh3.hash128(x, signed=False) for x in _bytes(urls)]
        try:
            import xxhash

            with timed(r, "url xxhash"):
                [xxhash.xxh3_128_intdigest(x) for x in _bytes(urls)]
        except ImportError:
            pass
        for k, v in r.items():
            res[k] = min(res.get(k, v), v)
    assert a.tobytes() == b"".join(b), "numba's BLAKE2b differs from hashlib's"
    got = [int(h2) << 64 | int(h1) for h1, h2 in u]
    assert got == m, "numba's MurmurHash3 differs from mmh3's"
    rows = []
    for what, base in (("uid", "uid hashlib"), ("url", "url mmh3")):
        for k in [k for k in res if k.startswith(what)]:
            rows.append({
                "hash": k, "rows": args.rows, "seconds": round(res[k], 3),
                "Mrows/s": round(args.rows / res[k] / 1e6, 2),
                "vs library": round(res[base] / res[k], 2),
            })  # fmt: skip
    cols = ["hash", "rows", "seconds", "Mrows/s", "vs library"]
    print(table(rows, cols))
    record("hashing", rows, cols, args)


def _bytes(arr: pa.Array):
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[: len(arr) + 1]
    data = arr.buffers()[2].to_pybytes()
    return [data[offsets[i] : offsets[i + 1]] for i in range(len(arr))]


if __name__ == "__main__":
    main()
