"""spark-submit entry point of stage 1: the same options and code path as ``primer filter``.

    spark-submit --master yarn jobs/text_filter.py --dataset StanfordCars \
        --metadata 's3://bucket/laion/*.parquet' --out s3://bucket/run/matches

The driver imports ``pipeline`` from the installed package, or else from the checkout this file
lives in. Executors need it too: install the package on the nodes (the Docker image does), or
ship it with ``--py-files`` (``zip -r primer.zip pipeline``).
"""

import os
import sys

try:
    import pipeline  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["filter", *sys.argv[1:]]))
