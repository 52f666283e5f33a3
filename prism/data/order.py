"""Data order as a pure function of (seed, step): a resumed run sees exactly the records an uninterrupted one
would. Each epoch is a seeded permutation of the records."""

from __future__ import annotations

import torch


def epoch_order(num_records: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_records, generator=generator)


def step_records(step: int, steps_per_epoch: int, global_batch: int, num_records: int, seed: int,
                 rank: int, world: int, per_device: int, accumulation: int) -> list[list[int]]:
    """Record indices of optimizer step `step` for one process: `accumulation` micro-batches of `per_device`."""
    epoch, offset = divmod(step, steps_per_epoch)
    order = epoch_order(num_records, seed, epoch)[offset * global_batch : (offset + 1) * global_batch].tolist()
    mine = order[rank::world]
    return [mine[i * per_device : (i + 1) * per_device] for i in range(accumulation)]
