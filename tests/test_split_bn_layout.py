"""SplitBatchNorm on channels-last tensors: the in-place path (CUDA's) equals the NCHW computation,
gradients and running statistics included, without a single layout copy."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mocohub.algorithm import SplitBatchNorm


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _run(bn, forward, x, grad, ops=None):
    """Forward and backward (recording their ops into ``ops``); output and gradients."""
    x = x.detach().requires_grad_()
    with ops or _Ops():
        out = forward(bn, x)
        out.backward(grad)
    return out, x.grad, bn.weight.grad, bn.bias.grad


@pytest.mark.parametrize("momentum", [0.1, None])
def test_in_place_groups_equal_the_regrouped_nchw_computation(momentum):
    torch.manual_seed(0)
    x = torch.randn(12, 5, 3, 4, dtype=torch.float64) * 3 + 1
    grad = torch.randn_like(x)
    ref_bn, bn = (SplitBatchNorm(5, num_splits=3, momentum=momentum).double().train() for _ in range(2))
    with torch.no_grad():
        for m in (ref_bn, bn):
            m.weight.copy_(torch.linspace(0.5, 2, 5)), m.bias.copy_(torch.linspace(-1, 1, 5))
    expected = _run(ref_bn, SplitBatchNorm._forward_regrouped, x, grad)
    ops, last = _Ops(), torch.channels_last
    got = _run(bn, SplitBatchNorm._forward_in_place, x.contiguous(memory_format=last),
               grad.contiguous(memory_format=last), ops)
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    assert got[0].is_contiguous(memory_format=torch.channels_last) and not got[0].is_contiguous()
    assert got[1].is_contiguous(memory_format=torch.channels_last) and not got[1].is_contiguous()
    assert not {"clone", "contiguous", "copy_", "_to_copy"} & set(ops.names), sorted(set(ops.names))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(ref_bn, name), msg=name)


def test_the_regrouping_copies_channels_last_where_the_in_place_path_does_not():
    """The check above can fail: the CPU path (the fused NCHW kernel) copies to NCHW and back."""
    x = torch.randn(8, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    ops = _Ops()
    _run(SplitBatchNorm(4, num_splits=2).train(), SplitBatchNorm.forward, x, torch.ones_like(x), ops)
    assert {"clone", "contiguous", "copy_", "_to_copy"} & set(ops.names)
