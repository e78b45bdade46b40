"""Inputs the text-filter tests share: a four-class dataset, captions with known answers, and
LAION-like parquet inputs (several files, row-group pieces, garbled pages)."""

from __future__ import annotations

import os

import pyarrow.parquet as pq

from pipeline.core import io
from pipeline.text_filter.terms import MatchRules

CLASSES = ["tabby cat", "golden retriever", "desert rose", "rose"]
SYNONYMS = {"golden retriever": ["goldie"]}
RULES = MatchRules(tuple(CLASSES), SYNONYMS)


KNOWN = [
    ("http://a.test/1.jpg", "My Tabby-Cat sleeping", "tabby cat"),
    ("http://a.test/2.jpg", "two golden retrievers", "golden retriever"),
    ("http://a.test/3.jpg", "Desert Rose (Adenium)", "desert rose"),
    ("http://a.test/4.jpg", "a red rose", "rose"),
    ("http://a.test/5.jpg", "tabby cat and rose", None),  # ambiguous
    ("http://a.test/6.jpg", "catalog page", None),
    ("http://a.test/7.jpg", None, None),
    ("http://a.test/8.jpg", "", None),
    ("http://a.test/9.jpg", "goldie at the beach", "golden retriever"),
]


def write_rows(tmp_path, name, rows, schema="laion2b"):
    """``rows`` of (url, caption, ...) as one parquet file in ``tmp_path/name``; returns the dir."""
    from pipeline.demo.synthetic import laion_table

    d = tmp_path / name
    d.mkdir(exist_ok=True)
    urls = [r[0] for r in rows]
    caps = [r[1] for r in rows]
    pq.write_table(
        laion_table(len(rows), schema=schema, urls=urls, captions=caps), d / "part-0.parquet"
    )
    return str(d)


def three_files(tmp_path):
    """Three 300-row files in ``tmp_path/in``; returns [(index, url)] as a scan task takes them."""
    from pipeline.demo.synthetic import laion_table

    d = tmp_path / "in"
    d.mkdir()
    for i in range(3):
        pq.write_table(laion_table(300, CLASSES, seed=i), d / f"p{i}.parquet")
    return list(enumerate(io.list_files(str(d), suffixes=(".parquet",))))


def garble_captions(path):
    """The file's caption pages garbled; its footer still reads."""
    meta = pq.read_metadata(path)
    cols = [meta.row_group(0).column(c) for c in range(meta.num_columns)]
    text = next(c for c in cols if c.path_in_schema == "TEXT")
    with open(path, "r+b") as f:
        f.seek(text.data_page_offset)
        f.write(b"\xff" * 256)


def split_input(tmp_path):
    """A 1200-row file of six 200-row row groups (with a row repeated across its first and last
    row group, and a URL shared by two captions across them) and a small second file."""
    from pipeline.demo.synthetic import laion_table

    d = tmp_path / "in"
    d.mkdir()
    big = laion_table(1200, CLASSES, seed=21, match_rate=0.5)
    caps, urls = big.column("TEXT").to_pylist(), big.column("URL").to_pylist()
    caps[5] = "my golden retriever"
    caps[1100], urls[1100] = caps[5], urls[5]  # the same row in piece 0 and piece 2
    caps[1101], urls[1101] = "another tabby cat", urls[7]  # the same URL, another row
    caps[7] = "a tabby cat"
    big = laion_table(1200, CLASSES, seed=21, urls=urls, captions=caps)
    pq.write_table(big, d / "a.parquet", row_group_size=200)
    pq.write_table(laion_table(150, CLASSES, seed=22, match_rate=0.5), d / "b.parquet")
    return str(d)


def part_bytes(out):
    """{part file name: bytes} of a text-filter output."""
    return {
        p: open(os.path.join(out, p), "rb").read()
        for p in sorted(os.listdir(out))
        if p.startswith("part-")
    }
