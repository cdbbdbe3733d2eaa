"""SplitBatchNorm: per-GPU BatchNorm statistics simulated on one device.

Shuffle BN needs BN statistics computed over sub-batches; on one device the batch is viewed as
``num_splits`` groups (sample n falls in group n % num_splits, as in the official CIFAR demo) and
normalised per group. Parameters and buffers keep BatchNorm2d's names, so state dicts are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SplitBatchNorm", "convert_split_batchnorm"]


class SplitBatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % self.num_splits:
            raise ValueError(f"batch of {n} cannot be split into {self.num_splits} BN groups; "
                             "choose a batch size divisible by the number of BN splits")
        s = self.num_splits
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        out = F.batch_norm(x.reshape(-1, c * s, h, w), mean, var, self.weight.repeat(s),
                           self.bias.repeat(s), True, self.momentum, self.eps).view(n, c, h, w)
        if x.is_contiguous(memory_format=torch.channels_last):  # the regrouping copied to NCHW: go back,
            out = out.contiguous(memory_format=torch.channels_last)  # or every later conv converts again
        with torch.no_grad():
            self.num_batches_tracked.add_(1)  # as BatchNorm2d counts, so the state dicts agree
            self.running_mean.copy_(mean.view(s, c).mean(0))
            self.running_var.copy_(var.view(s, c).mean(0))
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` by a SplitBatchNorm holding the same values."""
    if num_splits <= 1:
        return module
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                                   affine=child.affine, track_running_stats=child.track_running_stats)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            convert_split_batchnorm(child, num_splits)
    return module
