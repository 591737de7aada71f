"""Run by tests/test_distributed.py under torchrun: `dlm train` on two ranks with DDP, then with FSDP2.

    python -m torch.distributed.run --nproc-per-node 2 --standalone tests/distributed_worker.py OUT TRAIN-FLAGS...

One launch for both runs: starting the workers costs more than the tiny runs themselves.
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from dlm.cli import main

if __name__ == "__main__":
    out, flags = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")  # held across both runs (train() leaves a group it did not start)
    main(["train", *flags, "--out", f"{out}/ddp"])
    main(["train", *flags, "--out", f"{out}/fsdp", "--fsdp", "--grad-accum", "2"])
    dist.destroy_process_group()
