"""spark-submit entry point of stage 1 (same options as ``primer filter``).

    spark-submit --master yarn jobs/text_filter.py --dataset StanfordCars \
        --metadata 's3://bucket/laion/*.parquet' --out s3://bucket/run/matches
"""

import sys

import _bootstrap  # noqa: F401  (puts the repo root on sys.path)

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["filter", *sys.argv[1:]]))
