"""``python -m pipeline.embed ARGS``: ``primer embed-pool`` as one process of several.

Under ``torchrun --nproc_per_node=N -m pipeline.embed --shards ... --out ...`` every process
takes its share of the shards (``RANK``/``WORLD_SIZE`` from torchrun, GPU ``LOCAL_RANK``); the
rank that finds every shard done writes ``_SUCCESS``. The ranks join a process group (NCCL on
GPUs, gloo on CPUs) so that each exits only when all are done, and every one fails if any did.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    from pipeline.app.cli import main as primer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return primer(["embed-pool", *argv])
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    try:
        try:
            code = primer(["embed-pool", *argv])
        except Exception:  # still reach the all-reduce, or the other ranks would wait forever
            import logging

            logging.getLogger(__name__).exception("embed rank failed")
            code = 1
        failed = torch.tensor([1 if code else 0])
        dist.all_reduce(failed)
        return 1 if int(failed) else code
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
