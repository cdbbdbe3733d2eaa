"""MoCo v3's optimisers and per-iteration schedules (official ``moco/optimizer.py`` and ``main_moco.py``).

LARS is written here because ``timm.optim.Lars`` differs from the official update in three ways:
its trust ratio divides by ||g|| + wd*||p|| (not ||g + wd*p||), it adapts every parameter (the
official skips weight decay and adaptation for parameters with ndim <= 1: biases, norm layers), and
it tests ||g|| > 0 where the official tests the update's norm.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

__all__ = ["LARS", "v3_optimizer", "v3_lr", "v3_momentum", "scaled_lr"]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio, exactly as the official MoCo v3 LARS.

    For a parameter with ndim > 1: u = g + wd*p, scaled by trust_coefficient*||p||/||u|| when both
    norms are positive; other parameters take the plain gradient. Then mu = momentum*mu + u and
    p -= lr*mu. Its state is named ``mu``, as the official, so official optimizer states load.
    """

    def __init__(self, params: Iterable, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad for p in params]
            adapted = [i for i, p in enumerate(params) if p.ndim > 1]  # not biases or norm gamma/beta
            if adapted:
                weights = [params[i] for i in adapted]
                scaled = torch._foreach_add([updates[i] for i in adapted], weights, alpha=group["weight_decay"])
                p_norm = torch.stack(torch._foreach_norm(weights))
                u_norm = torch.stack(torch._foreach_norm(scaled))
                one = torch.ones_like(p_norm)
                trust = torch.where(p_norm > 0, torch.where(u_norm > 0, group["trust_coefficient"] * p_norm / u_norm,
                                                            one), one)
                torch._foreach_mul_(scaled, list(trust.unbind()))
                for i, u in zip(adapted, scaled):
                    updates[i] = u
            mus = []
            for p in params:
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mus.append(state["mu"])
            torch._foreach_mul_(mus, group["momentum"])
            torch._foreach_add_(mus, updates)
            torch._foreach_add_(params, mus, alpha=-group["lr"])
        return loss


def v3_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float, weight_decay: float,
                 momentum: float = 0.9) -> torch.optim.Optimizer:
    """``lars`` (ResNet recipes) or ``adamw`` (ViT; torch's defaults otherwise), as ``main_moco.py``.

    Frozen parameters (the momentum encoder, a frozen patch projection) are left out: the official
    passes them too, but they never get a gradient, so neither optimiser touches them.
    """
    trainable = [p for p in params if p.requires_grad]
    if name == "lars":
        return LARS(trainable, lr, weight_decay=weight_decay, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(trainable, lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid: lars, adamw")


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule of ``main_moco.py``: lr = base_lr * batch / 256 (total batch)."""
    return base_lr * batch_size / 256


def v3_lr(epoch: float, epochs: int, warmup: int, base_lr: float) -> float:
    """Linear warmup from 0, then a half-cosine to 0; ``epoch`` is fractional (set every iteration)."""
    if epoch < warmup:
        return base_lr * epoch / warmup
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def v3_momentum(epoch: float, epochs: int, m0: float) -> float:
    """"m-cos": the momentum rises from ``m0`` to 1 along a half-cosine over training."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - m0)
