"""BN statistics for a network that was never trained: the fair random baseline."""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["fit_batchnorm"]


@torch.no_grad()
def fit_batchnorm(model: torch.nn.Module, images: Iterable[torch.Tensor]) -> None:
    """Give ``model`` the BN statistics of ``images`` (batches), as training gives a trained network:
    otherwise part of a trained-versus-random gap would come from the statistics alone, not from learning."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the pass
    model.train()
    for batch in images:
        model(batch)
    model.eval()
