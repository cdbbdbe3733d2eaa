"""Process-group facts for a run: this process's rank, the device it owns, and the collectives
every rank must enter together (stop and NaN decisions, metric sums)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..algorithm.distributed import rank, world_size
from ..errors import MocohubError

__all__ = ["Runtime", "choose_device", "gpu_index", "backend_for", "group_options", "tune_backends"]


def gpu_index(local_rank: int, cuda_count: int) -> int:
    """The visible GPU of the process with ``local_rank``: ``cuda:LOCAL_RANK``, or the only one.

    Schedulers that bind one GPU per process (SLURM's per-task binding) show each process a single
    GPU while LOCAL_RANK runs up to 7: that one GPU is this process's. Only several visible GPUs and
    a LOCAL_RANK beyond them is ambiguous.
    """
    if local_rank < cuda_count:
        return local_rank
    if cuda_count == 1:
        return 0
    raise MocohubError(f"LOCAL_RANK {local_rank} has no GPU: {cuda_count} visible here (CUDA_VISIBLE_DEVICES); "
                       "start at most that many processes per node, or show each process its own GPU")


def choose_device(requested: str | None, *, local_rank: int, local_world: int, cuda_count: int) -> torch.device:
    """The device of this process.

    Default: this process's GPU (``gpu_index``) when GPUs are visible, else the CPU. ``cuda``
    without an index means the same. An explicit index under several local processes would put
    them all on one GPU, so it is refused; an index beyond the visible GPUs likewise.
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
        return torch.device("cuda", gpu_index(local_rank, cuda_count))
    if local_world > 1:
        raise MocohubError(f"--device {requested} would put all {local_world} processes of this node on one GPU; "
                           "use --device cuda (each process takes its own GPU)")
    if device.index >= cuda_count:
        raise MocohubError(f"{device} is not visible: {cuda_count} GPU(s) here (CUDA_VISIBLE_DEVICES); "
                           "start at most that many processes per node")
    return device


def backend_for(device: torch.device) -> str:
    """NCCL for GPU tensors, gloo for CPU ones: the backend follows the device, not the machine."""
    return "nccl" if device.type == "cuda" else "gloo"


def group_options(device: torch.device) -> dict:
    """``init_process_group`` arguments: NCCL is bound to this process's GPU (``device_id``), so
    barriers and object collectives know their device instead of guessing (and warning)."""
    if device.type == "cuda":
        return {"backend": "nccl", "device_id": device}
    return {"backend": backend_for(device)}


def tune_backends(device: torch.device) -> None:
    """cuDNN autotuning on CUDA, as both official scripts: the step's shapes repeat, so the search
    pays once (its gain only a GPU can measure; see benchmarks/README.md)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


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
        tune_backends(self.device)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group(**group_options(self.device))
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
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
