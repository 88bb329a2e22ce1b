"""Data parallelism for the PyTorch engine, launched by PyTorch's own `torchrun`.

torchrun starts one process per GPU and sets RANK, LOCAL_RANK and WORLD_SIZE; each process
builds the same engine, trains on its shard of every global batch (the trainer's `Ranks`),
and the engine sums gradients over the group before each optimizer step (see
docs/backends.md). Without torchrun the world is one process.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..config import Config
from ..errors import UserError


@dataclass
class TorchGroup:
    rank: int
    world: int
    device: torch.device

    @property
    def active(self) -> bool:
        return self.world > 1


def launch_command(n: int) -> str:
    return f"torchrun --standalone --nproc_per_node {n} -m mlx_dpo train CONFIG"


def setup_group(cfg: Config, device_kind: str) -> TorchGroup:
    """Join the torchrun group when there is one; check it matches compute.num_devices."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = cfg.compute.num_devices
    if world != wanted:
        how = f"launch with: {launch_command(wanted)}" if wanted > 1 else "set compute.num_devices to match"
        raise UserError(f"{cfg.source}: compute.num_devices is {wanted} but {world} process(es) were "
                        f"started; {how}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) found")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        # NCCL between GPUs; gloo lets the same code run on CPUs (the CI test does).
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
        atexit.register(_leave_group)
    rank = dist.get_rank() if world > 1 else 0
    return TorchGroup(rank, world, device)


def _leave_group() -> None:
    """At exit, the group torn down before the interpreter's own teardown, as PyTorch asks: left
    to static destructors, a gloo rank once aborted after a finished run ("terminate called without
    an active exception", SIGABRT; 1 of 15 two-rank CI runs here). Local only (no barrier), so a
    rank that exits on an error does not wait for the others."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum every gradient over the group in one flat buffer (one collective per step).

    Each rank's gradient is d(sum of its losses) / global_pairs, so the sum is the gradient
    of the mean loss over the whole global batch, however unevenly it was split."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


@torch.no_grad()
def broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Every rank's tensors take rank 0's values, in place; one collective per tensor (a one-off
    at the start of a run or a rollback, and no flat copy of a whole model's state)."""
    for tensor in tensors:
        dist.broadcast(tensor, src=0)


def all_reduce_array(values: np.ndarray, device: torch.device) -> np.ndarray:
    tensor = torch.as_tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy()
