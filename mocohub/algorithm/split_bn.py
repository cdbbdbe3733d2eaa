"""SplitBatchNorm: per-GPU BatchNorm statistics simulated on one device.

Shuffle BN needs BN statistics computed over sub-batches; on one device the batch is viewed as
``num_splits`` groups (sample n falls in group n % num_splits, as in the official CIFAR demo) and
normalised per group. Parameters and buffers keep BatchNorm2d's names, so state dicts are unchanged.

With NCHW tensors the groups are one free reshape into (N / s, s * C, H, W) for the fused batch norm.
With channels-last tensors that reshape is a copy to NCHW (and another back, forward and backward);
on CUDA the groups are normalised in place in channels-last memory instead (``_GroupedBatchNorm``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SplitBatchNorm", "convert_split_batchnorm"]


class _GroupedBatchNorm(torch.autograd.Function):
    """Batch norm of y (M, S, L, C) per (s, c) over M and L, in y's own memory: no layout copy.

    Returns the output and the groups' mean and biased variance (S, C), computed in y's dtype with
    fp32 accumulation, returned in at least fp32. The backward is batch norm's, grad_y = a * g + b * y + c
    with per-(s, c) coefficients: two reductions and one fused pass, as the fused kernels do.
    """

    @staticmethod
    def forward(ctx, y, weight, bias, eps):
        stats = torch.promote_types(y.dtype, torch.float32)  # fp32 statistics for bf16/fp16 activations
        var, mean = (t.to(stats) for t in torch.var_mean(y, dim=(0, 2), correction=0))
        invstd = torch.rsqrt(var + eps)
        scale = weight * invstd
        ctx.save_for_backward(y, mean, invstd, weight)
        ctx.mark_non_differentiable(mean, var)
        out = torch.addcmul(_per_group(bias - mean * scale, y), y, _per_group(scale, y))
        return out, mean, var

    @staticmethod
    def backward(ctx, grad, _mean, _var):
        y, mean, invstd, weight = ctx.saved_tensors
        count = y.numel() // mean.numel()
        sum_g = grad.sum((0, 2), dtype=mean.dtype)
        # centred (no cancellation when |mean| >> std); mean came from y's dtype, so this is exact
        sum_g_xhat = (grad * (y - _per_group(mean, y))).sum((0, 2), dtype=mean.dtype) * invstd
        a = weight * invstd
        b = -a * invstd * sum_g_xhat / count
        c = -a * sum_g / count - b * mean
        grad_y = torch.addcmul(torch.addcmul(_per_group(c, y), grad, _per_group(a, y)), y, _per_group(b, y))
        return grad_y, sum_g_xhat.sum(0), sum_g.sum(0), None


def _per_group(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(S, C) coefficients broadcast over (M, S, L, C), in ``like``'s dtype (bf16/fp16 under autocast)."""
    return t.to(like.dtype)[None, :, None, :]


class SplitBatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        if x.shape[0] % self.num_splits:
            raise ValueError(f"batch of {x.shape[0]} cannot be split into {self.num_splits} BN groups; "
                             "choose a batch size divisible by the number of BN splits")
        if x.is_cuda and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # Only a GPU can tell this path's speed against the copies (benchmarks/gpu_check.sh times
            # both); on the CPU oneDNN's fused NCHW kernel with both copies measured 2-2.6x faster (a
            # 256 x 64 x 32 x 32 bf16 layer, 8 groups, forward + backward), so the CPU keeps them.
            return self._forward_in_place(x)
        return self._forward_regrouped(x)

    def _forward_regrouped(self, x: torch.Tensor) -> torch.Tensor:
        """Groups as channels: (N / s, s * C, H, W), a free view of NCHW memory, one fused batch norm."""
        n, c, h, w = x.shape
        s = self.num_splits
        tracked = self.track_running_stats
        running = (self.running_mean.repeat(s), self.running_var.repeat(s)) if tracked else (None, None)
        out = F.batch_norm(x.reshape(-1, c * s, h, w), *running, self.weight.repeat(s) if self.affine else None,
                           self.bias.repeat(s) if self.affine else None, True, self._count_batch(),
                           self.eps).view(n, c, h, w)
        if x.is_contiguous(memory_format=torch.channels_last):  # the regrouping copied to NCHW: go back,
            out = out.contiguous(memory_format=torch.channels_last)  # or every later conv converts again
        if tracked:
            with torch.no_grad():
                self.running_mean.copy_(running[0].view(s, c).mean(0))
                self.running_var.copy_(running[1].view(s, c).mean(0))
        return out

    def _forward_in_place(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last memory is (N, H, W, C): (N / s, s, H * W, C) is a view of it with sample n in
        group n % s, normalised per (group, channel) without a layout copy."""
        n, c, h, w = x.shape
        s = self.num_splits
        plain = torch.promote_types(x.dtype, torch.float32)
        weight = self.weight if self.affine else x.new_ones(c, dtype=plain)
        bias = self.bias if self.affine else x.new_zeros(c, dtype=plain)
        out, mean, var = _GroupedBatchNorm.apply(x.permute(0, 2, 3, 1).reshape(n // s, s, h * w, c),
                                                 weight, bias, self.eps)
        count = n // s * h * w
        self._track(mean, var * (count / max(count - 1, 1)))
        return out.view(n, h, w, c).permute(0, 3, 1, 2)

    def _count_batch(self) -> float:
        """Count the batch as BatchNorm2d does (so the state dicts agree); the running averages' factor."""
        if not self.track_running_stats:
            return 0.0
        self.num_batches_tracked.add_(1)
        return self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)

    def _track(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """What F.batch_norm does to s repeated running buffers, averaged back over the groups."""
        factor = self._count_batch()
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean.mean(0).to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased_var.mean(0).to(self.running_var.dtype), factor)

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
