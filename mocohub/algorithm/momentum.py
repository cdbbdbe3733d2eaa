"""The momentum (EMA) update of a key encoder, as one fused multi-tensor operation."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["momentum_update_"]


@torch.no_grad()
def momentum_update_(key_params: Sequence[torch.Tensor], query_params: Sequence[torch.Tensor],
                     m: float) -> None:
    """theta_k <- m * theta_k + (1 - m) * theta_q over parameters (BN buffers are not averaged)."""
    torch._foreach_mul_(key_params, m)
    torch._foreach_add_(key_params, query_params, alpha=1.0 - m)
