"""One optimisation step of a reference and of mocohub side by side, checked to the last digits."""
import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, msg: str) -> None:
    """torch.testing.assert_close's check, |actual - expected| <= atol + rtol * |expected| elementwise,
    with a cheaper first pass: a step here compares some 30 million float64 values, and isclose's
    general path took most of these tests' time. Anything that pass does not clear (another shape,
    dtype or device, a non-float tensor, an infinite or NaN tolerance, a value out of tolerance) goes
    to torch.testing.assert_close itself, which decides and reports."""
    if (actual.is_floating_point() and actual.dtype == expected.dtype and actual.shape == expected.shape
            and actual.device == expected.device):
        tol = expected.abs().mul_(rtol).add_(atol)
        if bool(tol.sum().isfinite()) and bool(((actual - expected).abs_() <= tol).all()):  # inf or NaN: the sum is
            return
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg)


def step_both_and_compare(ref, ours, opt_ref, opt_ours, loss_r, loss_o) -> None:
    """Backward both losses, compare the query encoders' gradients, step both optimisers, then
    compare the whole state (encoders, queue and pointer)."""
    for opt, loss in ((opt_ref, loss_r), (opt_ours, loss_o)):
        opt.zero_grad()
        loss.backward()
    for (name, p_r), p_o in zip(ref.encoder_q.named_parameters(), ours.encoder_q.parameters()):
        assert_close(p_o.grad, p_r.grad, rtol=1e-7, atol=1e-9, msg=name)
    opt_ref.step()
    opt_ours.step()
    theirs, mine = ref.state_dict(), ours.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        assert_close(mine[key], value, rtol=1e-9, atol=1e-9, msg=key)
