"""The only host-to-device copies of the batched augmentation, none of which waits.

Every decision of the photometry (which samples a stage applies to, a jitter order, how many blur
taps a chunk needs) is taken on the host from the host's parameters; only the per-sample factors
the kernels multiply by go to the device. ``send`` puts all of a view's in one pinned buffer and
copies it without blocking, so the host never waits for the GPU (a blocking copy, or a read such
as ``.item()`` or ``.tolist()``, waits for every kernel queued before it: at the start of a step,
for the previous backward). On the CPU the "copies" are views of the host arrays.

What only a GPU can tell: whether the copy overlaps the previous step's kernels as intended, and
what the pinned buffers cost (PyTorch's caching host allocator reuses them once the copy is done).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["send", "to_device"]

Tree = dict[str, Any]  # nested dicts of numpy arrays or CPU tensors


def to_device(tensor: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """One host tensor on ``device``: pinned and copied without blocking (CUDA), as it is (CPU)."""
    tensor = torch.as_tensor(tensor)
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _floats(tree: Tree, prefix: tuple = ()) -> list[tuple[tuple, torch.Tensor]]:
    out = []
    for name, value in tree.items():
        if isinstance(value, dict):
            out.extend(_floats(value, prefix + (name,)))
        elif value.dtype.is_floating_point if isinstance(value, torch.Tensor) else value.dtype.kind == "f":
            out.append((prefix + (name,), torch.as_tensor(value)))
    return out


def send(tree: Tree, device: torch.device) -> Tree:
    """The floating-point leaves of ``tree`` as float32 tensors on ``device``, in the same nesting
    (other leaves, the host's decisions, are left out): one copy for all of them."""
    leaves = _floats(tree)
    if device.type == "cpu":
        tensors = [t.to(torch.float32) for _, t in leaves]
    else:
        flat = to_device(torch.cat([t.reshape(-1).to(torch.float32) for _, t in leaves]), device)
        tensors = [part.view(t.shape) for part, (_, t) in zip(flat.split([t.numel() for _, t in leaves]), leaves)]
    out: Tree = {}
    for (path, _), tensor in zip(leaves, tensors):
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = tensor
    return out
