"""Device choice and torch.distributed set-up for single-process and ``torchrun`` training."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def select_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """Choose the one device a run uses.

    Args:
        preference: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        local_rank: GPU index of this process under ``torchrun`` (used with ``"auto"``/``"cuda"``).
    """
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"config key 'device' is {preference!r} but CUDA is not available; use 'cpu' or 'auto'")
        if preference == "cuda":
            preference = f"cuda:{local_rank}"
        device = torch.device(preference)
        torch.cuda.set_device(device)
        return device
    if preference != "cpu":
        raise ValueError(f"config key 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {preference!r}")
    return torch.device("cpu")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only the main process logs, writes checkpoints and results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_preference: str = "auto") -> DistributedContext:
    """Initialise the process group when launched by ``torchrun`` (env ``WORLD_SIZE`` > 1).

    NCCL is used on CUDA, gloo on CPU. A plain ``python training.py`` run gets a single-process context.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    """Tear the process group down if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True outside torchrun and on global rank 0 under it (readable before any set-up)."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier(ctx: DistributedContext) -> None:
    """Wait for all ranks (no-op in a single process)."""
    if ctx.distributed:
        dist.barrier()
