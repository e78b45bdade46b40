"""The text filter's global filters (duplicate rows, URL de-duplication, the class cap) against
the rules written plainly, the sort they rest on, the keys they read, and URL buckets."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core import io
from pipeline.text_filter import batch as tfbatch
from pipeline.text_filter import global_filters as tfglobal
from pipeline.text_filter import parts as tfparts
from pipeline.text_filter import scan as tfscan
from pipeline.text_filter.config import TextFilterConfig
from pipeline.text_filter.stage import run_text_filter
from tests.text_filter.helpers import (
    RULES,
    part_bytes,
    split_input,
    three_files,
)

pytestmark = pytest.mark.usefixtures("spark")


def _reference_keep(rows, cfg):
    """The global filters written plainly: rows are (uid, url, label, part)."""
    from collections import defaultdict

    from pipeline.text_filter.hashing import cap_hash

    best = {}
    for uid, url, label, part in rows:
        if (uid, label) not in best or part < best[uid, label][1]:
            best[uid, label] = (url, part)
    items = [(uid, label, part, url) for (uid, label), (url, part) in best.items()]
    counts = {"dropped_duplicate_row": len(rows) - len(items)}
    if cfg.dedup_urls and items:
        smallest = {}
        for uid, _, _, url in items:
            if url is not None:
                smallest[url] = min(smallest.get(url, uid), uid)
        kept = [it for it in items if it[3] is not None and smallest[it[3]] == it[0]]
        counts["dropped_duplicate_url"] = len(items) - len(kept)
        items = kept
    if cfg.max_per_class and items:
        uids = sorted({it[0] for it in items})
        h = dict(zip(uids, cap_hash(uids, cfg.seed).tolist()))
        by_class = defaultdict(list)
        for it in items:
            by_class[it[1]].append(it)
        kept = [
            it
            for group in by_class.values()
            for it in sorted(group, key=lambda it: (h[it[0]], it[0]))[: cfg.max_per_class]
        ]
        counts["dropped_over_class_cap"] = len(items) - len(kept)
        items = kept
    return sorted((uid, label, part) for uid, label, part, _ in items), counts


@pytest.mark.parametrize("kernel", [True, False], ids=["numba", "numpy"])
def test_global_filters_against_brute_force(kernel, monkeypatch):
    """global_keep (a sort over uid and URL digests, then one compiled pass, or numpy where
    numba is missing) equals the rules written plainly, on random keys with rows repeated
    across parts, shared and missing URLs, and caps."""
    import random

    if not kernel:
        monkeypatch.setitem(sys.modules, "pipeline.text_filter.kernels", None)  # import fails

    import numpy as np

    from pipeline.text_filter.batch import match_keys
    from pipeline.text_filter.global_filters import global_keep, global_keep_keys

    rng = random.Random(7)
    for _ in range(80):
        # Some uids share their high word (the sort's first key): the low word must decide.
        high = [rng.getrandbits(64) for _ in range(3)]
        uids = [
            f"{(rng.choice(high) if rng.random() < 0.3 else rng.getrandbits(64)) << 64 | rng.getrandbits(64):032x}"
            for _ in range(rng.randint(1, 40))
        ]
        urls = [f"http://a.test/{i}.jpg" for i in range(rng.randint(1, 15))] + [None]
        url_of = {u: rng.choice(urls) for u in uids}
        picks = [rng.choice(uids) for _ in range(rng.randint(0, 120))]
        rows = [(u, url_of[u], rng.randint(0, 3), rng.randint(0, 2)) for u in picks]
        cfg = TextFilterConfig(
            dedup_urls=rng.random() < 0.7,
            max_per_class=rng.choice([0, 1, 3]),
            seed=rng.randint(0, 9),
        )
        keys = pa.table(
            {
                "uid": pa.array([r[0] for r in rows], pa.string()),
                "url": pa.array([r[1] for r in rows], pa.string()),
                "label": pa.array([r[2] for r in rows], pa.int32()),
                "part": pa.array([r[3] for r in rows], pa.int64()),
            }
        )
        kept, counts = global_keep(keys, cfg)
        got = sorted(zip(*(kept.column(c).to_pylist() for c in ("uid", "label", "part"))))
        want, want_counts = _reference_keep(rows, cfg)
        assert got == want
        assert {k: v for k, v in counts.items() if v} == {k: v for k, v in want_counts.items() if v}
        # The driver reads the kept indices as row numbers per part: they come back ascending.
        idx, _ = global_keep_keys(match_keys(keys), keys.column("part").to_numpy(), cfg)
        assert (np.diff(idx) > 0).all()


@pytest.mark.parametrize("kernel", [True, False], ids=["numba", "numpy"])
def test_url_run_starting_with_a_repeated_row(kernel, monkeypatch):
    """A uid found under two URLs (hostile fields: the uid joins URL and caption with 0x1F, so
    url "a\x1fb" + caption "c" and url "a" + caption "b\x1fc" share it; scans now drop URLs
    with control characters, but the pass must not rely on it): where the repeat of a
    (uid, label) starts a URL run, that run still belongs to its first uid, in the compiled
    pass as in numpy."""

    import numpy as np

    from pipeline.text_filter.batch import KEY_DTYPE
    from pipeline.text_filter.global_filters import global_keep_keys

    if not kernel:
        monkeypatch.setitem(sys.modules, "pipeline.text_filter.kernels", None)  # import fails
    rows = [(1, 3, 0), (1, 5, 0), (2, 5, 0), (2, 5, 1)]  # (url, uid, label)
    keys = np.zeros(len(rows), dtype=KEY_DTYPE)
    keys["url_hi"], keys["uid_lo"], keys["label"] = (np.array(c) for c in zip(*rows))
    keys["has_url"] = 1
    idx, counts = global_keep_keys(keys, np.array([0, 0, 1, 1]), TextFilterConfig())
    # (5, 0) is a repeat (kept in part 0, where URL 1's smallest uid 3 drops it); URL 2's run
    # belongs to uid 5, so (5, 1) stays.
    assert idx.tolist() == [0, 3]
    assert counts["dropped_duplicate_row"] == 1 and counts["dropped_duplicate_url"] == 1


def test_sort_keys_equals_lexsort():
    """_sort_keys (a value sort of the first key's high bits, ties fixed by the whole keys)
    gives np.lexsort's order: random hashes, keys differing only in their low bits (ties of
    the packed sort), exact repeats (by row number), three keys and six, empty and single
    rows."""
    import numpy as np

    from pipeline.text_filter.global_filters import _sort_keys

    rng = np.random.default_rng(11)
    u64 = np.uint64
    for n in (0, 1, 2, 7, 300, 5000):
        firsts = [
            rng.integers(0, 2**64 - 1, n, dtype=u64, endpoint=True),
            (rng.integers(0, 5, n, dtype=u64) << u64(40)) | rng.integers(0, 4, n, dtype=u64),
            rng.integers(0, 3, n, dtype=u64),
        ]
        for first in firsts:
            # Two more keys, or five (as URL de-duplication sorts: rows equal in the first three
            # are sorted by the rest apart), with few values each: ties in every key.
            for more in (2, 5):
                rest = tuple(
                    rng.integers(0, 3, n, dtype=u64) if k % 2 else rng.integers(0, 2, n)
                    for k in range(more)
                )
                got = _sort_keys(first, *rest)
                assert got.tolist() == np.lexsort((*reversed(rest), first)).tolist()


def test_keys_are_read_in_part_order_and_a_truncated_file_is_refused(tmp_path):

    out = str(tmp_path / "out")
    files = three_files(tmp_path)
    tfscan.scan_files(files, out, TextFilterConfig(), RULES)
    each = [
        np.frombuffer(io.read_bytes(tfparts._keys_path(out, i)), tfbatch.KEY_DTYPE) for i in (2, 0)
    ]
    keys, sizes = tfglobal._read_keys(out, [2, 0])
    assert sizes == [len(k) for k in each] and all(sizes)
    assert keys.tobytes() == b"".join(k.tobytes() for k in each)
    with open(tfparts._keys_path(out, 1), "ab") as f:
        f.write(b"x")  # not a whole number of records
    with pytest.raises(RuntimeError, match="part-00001.keys missing or truncated"):
        tfglobal._read_keys(out, [0, 1])
    assert tfglobal._read_keys(out, [])[1] == []
    with pytest.raises(RuntimeError, match="part-00000.keys missing or truncated"):
        tfglobal._read_keys(out, [0], [sizes[1] + 1])  # a whole record short of its stats' count
    assert tfglobal._read_keys(out, [2, 0], sizes)[1] == sizes


def test_global_buckets_fit_the_memory_budget():
    from pipeline.text_filter.global_filters import GLOBAL_BYTES_PER_MATCH, global_buckets

    mb = 1 << 20
    assert global_buckets(10**9, 0) == 1  # no limit
    assert global_buckets(0, 1) == 1
    assert global_buckets(mb // GLOBAL_BYTES_PER_MATCH, 1) == 1  # fits at once
    assert global_buckets(mb // GLOBAL_BYTES_PER_MATCH + 1, 1) == 2
    assert global_buckets(5 * mb // GLOBAL_BYTES_PER_MATCH, 1) == 8  # a power of two
    # 300M matches in the default 4 GB: 16 buckets of some 2.5 GB each.
    assert global_buckets(300_000_000, TextFilterConfig().global_memory_mb) == 16
    with pytest.raises(ValueError, match="global_memory_mb"):
        TextFilterConfig(global_memory_mb=-1)


@pytest.mark.parametrize(
    "cfg",
    [
        TextFilterConfig(),
        TextFilterConfig(dedup_urls=False),
        TextFilterConfig(max_per_class=300, seed=3),
        TextFilterConfig(dedup_urls=False, max_per_class=1000),
    ],
    ids=["dedup", "no-dedup", "cap", "no-dedup-cap"],
)
def test_global_filters_in_url_buckets_equal_one_pass_in_a_fraction_of_the_memory(tmp_path, cfg):
    """200k matches in five parts under a 1 MB budget: 32 URL buckets, the same kept rows,
    counts and per-class totals as one pass over all, at a fraction of its peak memory."""
    import dataclasses
    import tracemalloc

    from pipeline.demo.synthetic import scan_keys, write_scan_keys
    from pipeline.text_filter.global_filters import global_pass

    out = str(tmp_path / "out")
    done, matched = write_scan_keys(out, scan_keys(200_000, 5, seed=1))
    results = {}
    for mb in (0, 1):
        c = dataclasses.replace(cfg, global_memory_mb=mb)
        tracemalloc.start()
        results[mb] = global_pass(out, done, matched, c, 50)
        results[mb] += (tracemalloc.get_traced_memory()[1],)
        tracemalloc.stop()
    (kept1, counts1, per1, b1, peak1), (kept_b, counts_b, per_b, b, peak_b) = results.values()
    assert (b1, b) == (1, 32)
    assert (kept_b == kept1).all() and (per_b == per1).all()
    assert counts_b == counts1
    assert counts1["dropped_duplicate_row"] > 10_000
    if cfg.dedup_urls:
        assert counts1["dropped_duplicate_url"] > 10_000
    if cfg.max_per_class:
        assert counts1["dropped_over_class_cap"] > 0 and per1.max() == cfg.max_per_class
    assert peak_b < peak1 / 4, (peak_b, peak1)


def test_a_job_filtered_in_url_buckets_writes_what_one_pass_writes(
    tmp_path, dataset_yaml, monkeypatch
):
    """The whole job with the global filters forced into URL buckets (rows repeated across
    pieces, a URL shared across them, ambiguous rows kept, a cap): the same parts, byte for
    byte, and the same stats."""

    meta = split_input(tmp_path)
    runs, base = {}, tfglobal.GLOBAL_BYTES_PER_MATCH
    for per_match in (base, 1 << 14):
        monkeypatch.setattr(tfglobal, "GLOBAL_BYTES_PER_MATCH", per_match)
        for name, cfg in {
            "dedup": TextFilterConfig(split_rows=500, global_memory_mb=1),
            "ambiguous-cap": TextFilterConfig(
                split_rows=500, global_memory_mb=1, keep_ambiguous=True, max_per_class=30
            ),
        }.items():
            out = str(tmp_path / f"{name}-{per_match}")
            runs[name, per_match] = (run_text_filter(cfg, dataset_yaml, meta, out), part_bytes(out))
    for name in ("dedup", "ambiguous-cap"):
        (one, one_parts), (many, many_parts) = (runs[name, p] for p in (base, 1 << 14))
        assert one["global_buckets"] == 1 and many["global_buckets"] >= 8
        assert many_parts == one_parts
        for k in ("rows_matched", "dropped", "per_class"):
            assert many[k] == one[k], k
        assert one["dropped"]["duplicate_row"] >= 1
