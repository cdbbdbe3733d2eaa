"""One optimisation step of a reference and of mocohub side by side, checked to the last digits."""
import torch


def step_both_and_compare(ref, ours, opt_ref, opt_ours, loss_r, loss_o) -> None:
    """Backward both losses, compare the query encoders' gradients, step both optimisers, then
    compare the whole state (encoders, queue and pointer)."""
    for opt, loss in ((opt_ref, loss_r), (opt_ours, loss_o)):
        opt.zero_grad()
        loss.backward()
    for (name, p_r), p_o in zip(ref.encoder_q.named_parameters(), ours.encoder_q.parameters()):
        torch.testing.assert_close(p_o.grad, p_r.grad, rtol=1e-7, atol=1e-9, msg=name)
    opt_ref.step()
    opt_ours.step()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-9, atol=1e-9, msg=key)
