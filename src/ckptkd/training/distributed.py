"""Data-parallel training under torchrun: one process per device, each on its shard of every global batch.

    torchrun --nproc_per_node 4 -m ckptkd train CONFIG ...      (or: distill)

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. `data.batch_size` stays the global batch: every rank draws the same
global order and takes its own equal slice of each batch, DistributedDataParallel averages the gradients, and rank 0
alone evaluates and writes the run folder. The other ranks' BatchNorm statistics are replaced by rank 0's at every
forward (DDP's buffer broadcast), so the saved model is rank 0's. Outside torchrun every function here is a no-op.
"""

from __future__ import annotations

import atexit
import datetime
import os

import torch
import torch.distributed as dist

from ..errors import UserError


def launched() -> bool:
    """True in a process started by torchrun (even with one process: the code path is the same)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def rank() -> int:
    return int(os.environ.get("RANK", "0")) if launched() else 0


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group once per process (NCCL on CUDA, Gloo on CPU) and return this rank's device."""
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"config: device={device.type!r} is not supported under torchrun (use cuda or cpu)")
    if not dist.is_initialized():
        # Rank 0 alone builds a teacher cache and evaluates while the others wait: allow more than the 10 minutes
        # NCCL waits by default.
        timeout = datetime.timedelta(hours=2)
        if device.type == "cuda":  # binding the device also tells barriers which GPU to use
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
        atexit.register(_teardown)
    return device


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """Leave the process group together, once a command has succeeded on every rank: a rank that tore Gloo down while
    another still held its connections was seen to abort the other (SIGABRT, "terminate called without an active
    exception") after a finished run. On failure the atexit teardown remains, and torchrun stops the other ranks."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_batch(batch_size: int) -> None:
    if batch_size % world_size():
        raise UserError(f"config: data.batch_size={batch_size} (the global batch) does not split evenly over the "
                        f"{world_size()} processes torchrun started")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place; returns it."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model as the training step should call it: DDP under torchrun, the model itself otherwise."""
    if not dist.is_initialized():
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def describe() -> dict | None:
    if not dist.is_initialized():
        return None
    return {"world_size": world_size(), "backend": dist.get_backend()}
