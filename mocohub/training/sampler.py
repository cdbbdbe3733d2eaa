"""A DistributedSampler that can start mid-epoch, so a resumed run sees the batches it missed."""
from __future__ import annotations

from typing import Iterator

from torch.utils.data import DistributedSampler

__all__ = ["ResumableSampler"]


class ResumableSampler(DistributedSampler):
    """The epoch's permutation depends only on (seed, epoch), on one process as on many."""

    def __init__(self, dataset, *, num_replicas: int = 1, rank: int = 0, seed: int = 0, drop_last: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start`` indices of this rank."""
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start
