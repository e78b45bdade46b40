"""Benchmark of stage 1b: captions scored per second by the caption sense filter, against the
bare encoder on the same captions in the same process.

Rows (same encoder, device and batch size; the model is loaded before timing):

- ``encoder only``: ``encode`` of the captions, nothing else (the ceiling);
- ``score_captions``: the filter's core (:func:`pipeline.caption_filter.score.score_captions`):
  encode, the class prototypes and negatives (built once, outside the timing), the margin;
- ``filter_file``: one match parquet file end to end (read, score, keep, write the part and
  its marker), as a Spark task runs it, on a fresh output each repeat.

Captions are the real captions of tests/data/real_captions/labels.csv, repeated to ``--rows``,
under random Flowers102 labels. The ratio column is captions/s relative to the bare encoder.

    .venv/bin/python bench/caption_filter.py --rows 4000
    python bench/caption_filter.py --device cuda --rows 200000 --batch-size 1024
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _util import add_record_flag, record, table  # noqa: E402

from pipeline.caption_filter.config import CaptionFilterConfig  # noqa: E402
from pipeline.caption_filter.encoders import load_encoder  # noqa: E402
from pipeline.caption_filter.score import build_index, score_captions  # noqa: E402
from pipeline.caption_filter.stage import _scorer, filter_file  # noqa: E402
from pipeline.core.config import load_dataset  # noqa: E402

LABELS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "tests", "data", "real_captions", "labels.csv",
)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs per row")
    p.add_argument("--encoder", choices=["minilm", "open_clip"], default="minilm")
    p.add_argument("--model", default="ViT-B-32", help="open_clip encoder's model (untrained)")
    add_record_flag(p)
    p.add_argument(
        "--quick", action="store_true", help="a small run (seconds to a minute) for make bench"
    )
    a = p.parse_args()
    if a.quick:
        a.rows, a.repeats = min(a.rows, 256), 1
    cfg = CaptionFilterConfig(device=a.device, batch_size=a.batch_size, encoder=a.encoder)
    embed_cfg = None
    if a.encoder == "open_clip":
        from pipeline.embed.config import EmbedConfig

        # Weights do not change speed: an untrained text tower of the named model.
        embed_cfg = EmbedConfig(model=a.model, pretrained="none", device=a.device)
    with open(LABELS, encoding="utf-8", newline="") as f:
        real = [r["caption"] for r in csv.DictReader(f)]
    captions = [real[i % len(real)] for i in range(a.rows)]
    spec = load_dataset("Flowers102")
    labels = np.random.default_rng(0).integers(0, spec.num_classes, a.rows)
    encoder = load_encoder(cfg, embed_cfg)
    index = build_index(spec, cfg.templates, cfg.negatives, encoder.encode)
    encoder.encode(captions[: a.batch_size])  # warm-up (kernels, allocator)
    _scorer(cfg, spec.path, embed_cfg)  # the task's prototypes, built once per worker, not timed
    tmp = tempfile.mkdtemp(prefix="primer-bench-cf-")
    src = os.path.join(tmp, "part-00000.parquet")
    pq.write_table(pa.table({"caption": captions, "label": pa.array(labels, pa.int32())}), src)

    def bare():
        for s in range(0, a.rows, a.batch_size):
            encoder.encode(captions[s : s + a.batch_size])

    def core():
        score_captions(pa.array(captions), labels, index, encoder.encode, a.batch_size)

    def task():
        out = tempfile.mkdtemp(dir=tmp)
        filter_file(0, src, out, cfg, spec.path, embed_cfg)
        shutil.rmtree(out)

    rows = []
    try:
        for name, fn in (("encoder only", bare), ("score_captions", core), ("filter_file", task)):
            best = float("inf")
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            rows.append({"path": name, "seconds": best, "captions/s": a.rows / best})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0]["captions/s"]
    for r in rows:
        r["ratio"] = r["captions/s"] / base
    what = f"{a.rows} captions, {encoder.name} on {encoder.device}, batch {a.batch_size}"
    print(what)
    cols = ["path", "seconds", "captions/s", "ratio"]
    print(table(rows, cols))
    record("caption_filter", rows, cols, a, note=f"{what}; best of {a.repeats}")


if __name__ == "__main__":
    main()
