"""Training on several processes under torchrun: process group, DDP / FSDP2, full state dicts, the launcher.

`torchrun --nproc-per-node N -m dlm.train ...` (or `dlm train --nproc N ...`, which runs torchrun for you) starts N
copies of `dlm train`. Each reads its rank from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK), joins
the process group (gloo on CPU, nccl on GPU) and wraps the network in DistributedDataParallel, or shards it with
FSDP2 (`torch.distributed.fsdp.fully_shard`: each layer of every nn.ModuleList, then the root). dlm.trainer gives
each rank its rows of every global batch.

Checkpoints hold full, unsharded state dicts gathered with torch.distributed.checkpoint's `get_*_state_dict`
helpers (parameters and optimizer state keyed by name), so a run saved on N ranks resumes on any number of ranks,
with or without FSDP, and its weights load in a single process like any other checkpoint.

    env = init_distributed("cpu"); model = env.wrap(model, fsdp=True); ...; env.close()
    sys.exit(launch(["train", "--data", "shakespeare", "--out", "runs/x"], nproc=2))   # `dlm train --nproc 2`
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

# Gathered on rank 0, in CPU memory: what a checkpoint writes.
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class DistEnv:
    """This process's place in a run: rank, world size, the device it trains on; one process by default."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    owns_group: bool = False  # init_distributed started the process group, so close() ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module, fsdp: bool = False) -> nn.Module:
        """DDP, or FSDP2 sharding (in place: the returned module is `model`), or `model` itself on one process."""
        if not self.distributed:
            return model
        if fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(torch.device(self.device).type, (self.world_size,))
            for layers in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
                for layer in layers:  # the repeated blocks: one all-gather per block in forward and backward
                    fully_shard(layer, mesh=mesh)
            return fully_shard(model, mesh=mesh)
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.device(self.device).index] if torch.device(self.device).type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a small float tensor (the logged loss)."""
        if not self.distributed:
            return values
        values = values.to(self.device, torch.float64)
        dist.all_reduce(values)
        return values.cpu() / self.world_size

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(device: str = "cpu") -> DistEnv:
    """Join the process group torchrun describes in the environment; one process (no group) outside torchrun.

    `device` "cuda" becomes this rank's GPU, cuda:LOCAL_RANK (and nccl); "cpu" trains on gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    kind = torch.device(device).type
    if kind == "cuda" and world > 1:
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    env = DistEnv(rank=rank, world_size=world, device=device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
        env.owns_group = True
    return env


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (an FSDP2 module is its own network)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Let backward reduce gradients across ranks only when `enabled` (the last micro-batch of a step)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    set_sync = getattr(model, "set_requires_gradient_sync", None)  # FSDP2
    if set_sync is not None:
        set_sync(enabled)
    yield


def as_local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor holding a replicated value (FSDP2's gradient norm) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_model_state(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The full state dict on rank 0 (on CPU; other ranks get {}), every rank taking part; without the frozen
    parameters when `trainable_only` (a LoRA run's base weights are not trainer state)."""
    return get_model_state_dict(unwrap(model), options=replace(GATHER, ignore_frozen_params=trainable_only))


def gather_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state keyed by parameter name, on rank 0; every rank takes part."""
    return get_optimizer_state_dict(unwrap(model), opt, options=GATHER)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every rank holds it) into a plain, DDP or FSDP2 model. Frozen parameters (a LoRA
    run's base weights) may be absent and stay as loaded; set_model_state_dict would fill any other missing key
    with the model's current value, so the keys are checked here first."""
    net = unwrap(model)
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    expected = set(net.state_dict())
    missing, unexpected = expected - set(state) - frozen, set(state) - expected
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not fit the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    set_model_state_dict(net, state, options=StateDictOptions(full_state_dict=True, strict=False))


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(unwrap(model), opt, state, options=StateDictOptions(full_state_dict=True))


def is_launched() -> bool:
    """True inside a process that torchrun started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def torchrun_command(argv: Sequence[str], nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None
                     ) -> list[str]:
    """`python -m torch.distributed.run ... -m dlm.cli ARGV`: N workers on this node; several nodes meet at
    `rdzv_endpoint` (host:port of any one of them) with the c10d rendezvous, else a standalone local one."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", str(nnodes)]
    if rdzv_endpoint:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint]
    else:
        if nnodes > 1:
            raise ValueError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        cmd += ["--standalone"]
    return [*cmd, "-m", "dlm.cli", *argv]


def launch(argv: Sequence[str], nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None) -> int:
    """Run `dlm ARGV` on nproc workers per node under torchrun; returns its exit status."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    return subprocess.call(torchrun_command(argv, nproc, nnodes, rdzv_endpoint))
