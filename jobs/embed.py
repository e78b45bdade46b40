"""Multi-GPU entry point of stage 3 (same options as ``primer embed``).

One process per GPU; process ``r`` of ``W`` embeds ``tars[r::W]`` into the shared ``--out``
and whichever process finds every shard done writes ``_SUCCESS``. Two ways to start them:

torchrun (one node or several; torchrun sets RANK, WORLD_SIZE and LOCAL_RANK, and each
process takes GPU LOCAL_RANK)::

    torchrun --nproc_per_node=8 -m pipeline.embed --shards s3://bucket/run/shards \\
        --out s3://bucket/run/emb/pool --model ViT-B-16 --pretrained laion2b_s34b_b88k \\
        --workers 12 --batch-size 512

Spark with GPU scheduling (``--spark``): one task per rank, each holding one GPU; the task
pins its GPU through CUDA_VISIBLE_DEVICES from ``TaskContext.resources()``::

    spark-submit --master yarn \\
        --conf spark.executor.resource.gpu.amount=1 --conf spark.task.resource.gpu.amount=1 \\
        --conf spark.executor.cores=12 --conf spark.task.cpus=12 \\
        --conf spark.executor.resource.gpu.discoveryScript=/opt/spark/scripts/getGpusResources.sh \\
        --py-files primer.zip jobs/embed.py --spark --world-size 8 \\
        --shards s3://bucket/run/shards --out s3://bucket/run/emb/pool --model ViT-B-16 ...

``spark.task.cpus`` should cover ``--workers`` (the DataLoader's decode processes), and the
executors need the same Python stack (``docker/``). Ranks are independent: a rerun skips the
shards already done, so a failed Spark task is simply retried.
"""

import sys

import _bootstrap  # noqa: F401  (puts the repo root on sys.path)

from pipeline.app.cli import main


def _spark_ranks(argv: list[str]) -> int:
    """Run ``primer embed`` ranks 0..W-1 as Spark tasks, one GPU each; returns an exit code."""
    from pipeline.app.cli import build_parser
    from pipeline.core.spark import get_spark

    args = build_parser().parse_args(["embed-pool", *argv])
    if not args.param__world:
        raise SystemExit("--spark needs --world-size W (the number of GPUs to use)")
    world = args.param__world

    def run_rank(index, _rows):
        import os

        from pyspark import TaskContext

        gpus = (TaskContext.get().resources() or {}).get("gpu")
        if gpus is not None and gpus.addresses:
            # This task's GPU becomes cuda:0 of the process.
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus.addresses)
        os.environ["LOCAL_RANK"] = "0"
        code = main(["embed-pool", *argv, "--rank", str(index), "--world-size", str(world)])
        yield index, code

    spark = get_spark()
    results = (
        spark.sparkContext.parallelize(range(world), world)
        .mapPartitionsWithIndex(run_rank)
        .collect()
    )
    failed = sorted(r for r, code in results if code)
    if failed:
        sys.stderr.write(f"embed ranks {failed} failed; rerun to resume (done shards are kept)\n")
        return 1
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--spark" in argv:
        argv.remove("--spark")
        sys.exit(_spark_ranks(argv))
    sys.exit(main(["embed-pool", *argv]))
