"""The epoch's sample order as a sequence of global batches, so a run can resume mid-epoch under
any number of processes: step s of epoch e is the same images whoever takes their share of it."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Step s of epoch e takes images perm[s*B:(s+1)*B] of the (seed, e) permutation (B the global
    batch); rank r of w processes yields its contiguous 1/w of each step. The last partial batch
    is dropped, as the official DistributedSampler + drop_last does."""

    def __init__(self, num_samples: int, batch_size: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        if batch_size % num_replicas:
            raise ValueError(f"the global batch {batch_size} is not divisible by {num_replicas} processes")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.per_rank, self.rank = batch_size // num_replicas, rank
        self.steps = num_samples // batch_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start_step`` global batches."""
        self.epoch, self.start = epoch, start_step

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.num_samples, generator=g)[:self.steps * self.batch_size]
        mine = perm.view(self.steps, -1, self.per_rank)[self.start:, self.rank]
        return iter(mine.reshape(-1).tolist())

    def __len__(self) -> int:
        return (self.steps - self.start) * self.per_rank
