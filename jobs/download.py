"""spark-submit entry point of stage 2: ``primer download`` with img2dataset's pyspark distributor.

    spark-submit --master yarn --py-files primer.zip jobs/download.py \
        --matches s3://bucket/run/matches --out s3://bucket/run/shards --threads 64

Each img2dataset shard (``download.samples_per_shard`` rows) becomes one Spark task that
downloads it with ``--threads`` threads on an executor; ``--processes`` is unused here (Spark's
executor cores decide the parallelism). The executors need the same Python stack and the
``pipeline`` package: install it on the nodes (the Docker image does) or ship it with
``--py-files`` (``zip -r primer.zip pipeline``). The driver writes the manifest, stats and
``_SUCCESS``; a rerun resumes from the finished shards like ``primer download``.
"""

import sys

import _bootstrap  # noqa: F401  (puts the repo root on sys.path)

from pipeline.app.cli import main


def run(argv: list[str]) -> int:
    """``primer download ARGV`` with the pyspark distributor (it wins over ``--set``)."""
    return main(["download", *argv, "--set", "download.distributor=pyspark"])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
