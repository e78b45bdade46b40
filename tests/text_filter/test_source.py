"""Issue 21: every text-filter match records its source file and row (scan format 5), so
precomputed embeddings aligned with the metadata can be read by row."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.demo.synthetic import laion_table
from pipeline.text_filter.batch import filter_batch, resolve_columns
from pipeline.text_filter.config import TextFilterConfig
from pipeline.text_filter.matcher import Matcher
from pipeline.text_filter.stage import run_text_filter

CLASSES = ["tabby cat", "golden retriever", "rose"]


def test_batch_core_records_file_and_row():
    captions = [
        "a rose",
        "nothing",
        "tabby cat nap",
        None,
        "golden retriever",
        "rose and tabby cat",
    ]
    urls = [f"http://a.test/{i}.jpg" for i in range(len(captions))]
    batch = pa.RecordBatch.from_pydict({"url": urls, "caption": captions})
    cfg = TextFilterConfig(keep_ambiguous=True)
    cols = resolve_columns(batch.schema, cfg.columns, "mem")
    out = filter_batch(
        batch, cols, Matcher(CLASSES), cfg, CLASSES, Counter(), "s3://b/meta_7.parquet", 1000
    )
    rows = out.column("source_row").to_pylist()
    assert rows == [1000, 1002, 1004, 1005, 1005]  # the ambiguous row once per class
    assert set(out.column("source_file").to_pylist()) == {"s3://b/meta_7.parquet"}
    assert out.schema.field("source_row").type == pa.int64()
    for r, u in zip(rows, out.column("url").to_pylist()):
        assert urls[r - 1000] == u
    # Without a file (a batch from memory) the file is null and the row the batch's own.
    bare = filter_batch(batch, cols, Matcher(CLASSES), cfg, CLASSES, Counter())
    assert bare.column("source_file").null_count == bare.num_rows
    assert bare.column("source_row").to_pylist() == [0, 2, 4, 5, 5]


@pytest.mark.spark
@pytest.mark.usefixtures("spark")
def test_stage_rows_point_at_their_input_rows(tmp_path):
    """Three files of several row groups, the largest scanned in pieces, small batches, a cap
    and URL de-duplication: each kept match's (source_file, source_row) is the input row with
    its URL and caption."""
    ds_yaml = tmp_path / "pets.yaml"
    ds_yaml.write_text(f"name: Pets\nclasses: {CLASSES}\n")
    meta = tmp_path / "meta"
    meta.mkdir()
    rng = np.random.default_rng(0)
    inputs = {}
    for i, n in enumerate([700, 1300, 260]):
        t = laion_table(n, CLASSES, seed=i)
        # Some URLs repeated across files, so de-duplication drops rows in the middle.
        urls = t.column("URL").to_pylist()
        for j in rng.choice(n, n // 10, replace=False):
            urls[j] = f"http://dup.test/{j % 17}.jpg"
        t = t.set_column(t.schema.get_field_index("URL"), "URL", pa.array(urls))
        path = meta / f"metadata_{i:04d}.parquet"
        pq.write_table(t, path, row_group_size=200)
        inputs[str(path)] = t
    cfg = TextFilterConfig(split_rows=500, batch_rows=64, max_per_class=150, task_rows=0)
    out = str(tmp_path / "out")
    stats = run_text_filter(cfg, str(ds_yaml), str(meta), out, master="local[2]")
    got = ds.dataset(out).to_table()
    assert stats["scan_units"] > 3 and got.num_rows == stats["rows_matched"] > 100
    files = got.column("source_file").to_pylist()
    rows = got.column("source_row").to_pylist()
    assert set(files) == set(inputs)
    for f, r, url, cap in zip(
        files, rows, got.column("url").to_pylist(), got["caption"].to_pylist()
    ):
        src = inputs[f]
        assert src.column("URL")[r].as_py() == url and src.column("TEXT")[r].as_py() == cap
    # Rows of the second file's later pieces: the offset of a piece is counted, not restarted.
    assert max(r for f, r in zip(files, rows) if f.endswith("metadata_0001.parquet")) > 1000
