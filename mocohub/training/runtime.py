"""Process-group facts for a run: this process's rank, the device it owns, and the collectives
every rank must enter together (stop and NaN decisions, metric sums)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..algorithm.distributed import rank, world_size
from ..errors import MocohubError

__all__ = ["Runtime", "choose_device", "backend_for"]


def choose_device(requested: str | None, *, local_rank: int, local_world: int, cuda_count: int) -> torch.device:
    """The device of this process.

    Default: ``cuda:LOCAL_RANK`` when GPUs are visible, else the CPU. ``cuda`` without an index
    means the same. An explicit index under several local processes would put them all on one
    GPU, so it is refused; an index beyond the visible GPUs likewise.
    """
    if requested is None:
        requested = "cuda" if cuda_count else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as e:
        raise MocohubError(f"--device {requested!r} is not a device: use cpu, cuda or cuda:N") from e
    if device.type != "cuda":
        return device
    if not cuda_count:
        raise MocohubError(f"--device {requested}: no CUDA GPU is visible here; use --device cpu")
    if device.index is None:
        device = torch.device("cuda", local_rank)
    elif local_world > 1:
        raise MocohubError(f"--device {requested} would put all {local_world} processes of this node on one GPU; "
                           "use --device cuda (each process takes cuda:LOCAL_RANK)")
    if device.index >= cuda_count:
        raise MocohubError(f"{device} is not visible: {cuda_count} GPU(s) here (CUDA_VISIBLE_DEVICES); "
                           "start at most that many processes per node")
    return device


def backend_for(device: torch.device) -> str:
    """NCCL for GPU tensors, gloo for CPU ones: the backend follows the device, not the machine."""
    return "nccl" if device.type == "cuda" else "gloo"


class Runtime:
    """One per training process; starts (and later ends) the process group when torchrun asked."""

    def __init__(self, device: str | None):
        self.owns_group = False
        local = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        self.device = choose_device(device, local_rank=local, local_world=local_world, cuda_count=cuda_count)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group(backend_for(self.device))
            self.owns_group = True
        self.world, self.rank = world_size(), rank()
        self.main = self.rank == 0

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def any(self, *flags: torch.Tensor | bool) -> list[bool]:
        """Whether each flag holds on at least one rank: one all-reduce for all of them, so every
        rank takes the same decision at the same step."""
        t = torch.stack([torch.as_tensor(f, device=self.device).float().reshape(()) for f in flags])
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (e.g. a run folder name with a timestamp in it)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
