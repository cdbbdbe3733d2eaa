"""A real 2-process torch.distributed (gloo) MoCo v3 step, checked against a single-process emulation.

Without SyncBatchNorm: torch's SyncBatchNorm refuses CPU tensors, so each rank normalises its own
batch here (as the official code would without SyncBN); the gathered keys, rank-offset labels and
averaged gradients are what this checks."""
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from mocohub import MoCoV3
from test_distributed import PER_RANK, WORLD, _inputs, two_process_steps

M, T = 0.9, 0.5


def _model() -> MoCoV3:
    torch.manual_seed(0)
    return MoCoV3("resnet18", dim=8, mlp_dim=16, T=T, stem="cifar")


def v3_step(rank: int, out: str) -> None:
    """Rank ``rank``'s step, in the process group test_distributed.py's spawn set up."""
    model = _model()
    x1, x2 = _inputs()
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    net = DistributedDataParallel(model)  # kept alive until backward: its reducer averages the gradients
    loss, logits, labels = net(x1[mine], x2[mine], M, return_loss=True)
    loss.backward()
    torch.save({"loss": loss.detach(), "logits": logits.detach(), "labels": labels,
                "grads": {n: p.grad for n, p in model.named_parameters() if p.requires_grad},
                "momentum": {n: p for n, p in model.momentum_encoder.named_parameters()}}, f"{out}.{rank}")


def _emulate() -> dict:
    """Per-rank BN; every rank's keys of both views gathered; the positive of rank r's query n is key
    N*r + n; DDP averages the ranks' gradients."""
    model = _model()
    x1, x2 = _inputs()
    model._update_momentum_encoder(M)
    ranks = [slice(r * PER_RANK, (r + 1) * PER_RANK) for r in range(WORLD)]
    with torch.no_grad():
        k1, k2 = (torch.cat([F.normalize(model.momentum_encoder(x[s]), dim=1) for s in ranks]) for x in (x1, x2))
    losses, logits = [], []
    for r, s in enumerate(ranks):
        q1, q2 = (F.normalize(model.predictor(model.base_encoder(x[s])), dim=1) for x in (x1, x2))
        labels = torch.arange(PER_RANK) + PER_RANK * r
        logits.append(torch.cat([q1 @ k2.T, q2 @ k1.T]) / T)
        losses.append(2 * T * (F.cross_entropy(q1 @ k2.T / T, labels) + F.cross_entropy(q2 @ k1.T / T, labels)))
    (sum(losses) / WORLD).backward()
    return {"loss": [l.detach() for l in losses], "logits": [l.detach() for l in logits],
            "grads": {n: p.grad for n, p in model.named_parameters() if p.requires_grad},
            "momentum": dict(model.momentum_encoder.named_parameters())}


def test_two_process_v3_step_matches_emulation():
    out = f"{two_process_steps()}.v3"
    expected = _emulate()
    for r in range(WORLD):
        got = torch.load(f"{out}.{r}", weights_only=True)
        assert got["labels"].tolist() == [PER_RANK * r + n for n in range(PER_RANK)] * 2
        torch.testing.assert_close(got["logits"], expected["logits"][r], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["loss"], expected["loss"][r], rtol=1e-4, atol=1e-5)
        assert got["grads"].keys() == expected["grads"].keys()
        for name, grad in expected["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-3, atol=1e-5, msg=name)
        for name, value in expected["momentum"].items():
            torch.testing.assert_close(got["momentum"][name], value, msg=name)
