"""Which episodes each process trains on, step by step, and the loader that delivers them.

Each step consumes ``batch_size * world_size`` episodes from one seeded stream: episode number
``step * batch_size * world_size + rank * batch_size + j``. So a run is reproducible, ranks never see the
same episode, N processes with batch b follow the same data as one process with batch N*b, and a resumed
run continues with the episodes it would have drawn.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpisodeIndexSampler", "episode_loader"]


class EpisodeIndexSampler(Sampler[int]):
    """Episode numbers of one rank, from ``start_step`` on (see the module docstring)."""

    def __init__(self, start_step: int, n_steps: int, batch_size: int, rank: int, world_size: int):
        self.start_step, self.n_steps = start_step, n_steps
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        per_step = self.batch_size * self.world_size
        for step in range(self.start_step, self.n_steps):
            first = step * per_step + self.rank * self.batch_size
            yield from range(first, first + self.batch_size)

    def __len__(self) -> int:
        return max(0, self.n_steps - self.start_step) * self.batch_size


def episode_loader(episodes: Dataset, sampler: EpisodeIndexSampler, num_workers: int,
                   device: torch.device) -> DataLoader:
    """Batches of ``sampler.batch_size`` episodes, prepared by ``num_workers`` processes (0: this one)."""
    return DataLoader(
        episodes, batch_size=sampler.batch_size, sampler=sampler, num_workers=num_workers,
        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
