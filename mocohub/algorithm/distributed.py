"""Collectives the algorithm needs; each is the identity on a single process."""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["world_size", "rank", "concat_all_gather", "shuffle_across_ranks", "unshuffle"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (no gradient flows back)."""
    if world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


@torch.no_grad()
def shuffle_across_ranks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle BN's input shuffle: gather every rank's images, permute them with one permutation
    drawn on rank 0, and hand each rank its slice. Returns the slice and the inverse permutation.

    On one process the batch is permuted locally, which with SplitBatchNorm plays the same role.
    """
    gathered = concat_all_gather(x)
    perm = torch.randperm(gathered.shape[0], device=x.device)
    if world_size() > 1:
        dist.broadcast(perm, src=0)
    local = perm.view(world_size(), -1)[rank()]
    return gathered[local], torch.argsort(perm)


@torch.no_grad()
def unshuffle(keys: torch.Tensor, inverse_perm: torch.Tensor) -> torch.Tensor:
    """Undo ``shuffle_across_ranks`` for this rank's keys."""
    gathered = concat_all_gather(keys)
    local = inverse_perm.view(world_size(), -1)[rank()]
    return gathered[local]
