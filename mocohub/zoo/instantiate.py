"""Models built straight onto their pretrained weights, with strict loading.

Randomly initialising a ResNet-50 costs more than reading its weights, and loading overwrites
every value anyway. So the model is built on the meta device (no memory, no init) and
``load_state_dict(assign=True)`` makes the checkpoint's tensors (memory-mapped for safetensors)
the model's own. Whenever the weights do not cover the whole model (a fresh classifier, a
buffer that is not saved), the model is built normally instead, so nothing is left on meta.
"""
from __future__ import annotations

import itertools
from typing import Callable, Mapping

import torch
import torch.nn as nn

from ..errors import MocohubError

__all__ = ["load_strict", "build_loaded"]


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, fresh: str | None = None) -> None:
    """Load every weight; only a freshly initialised classifier (``fresh.``) may stay missing."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not (fresh and k.startswith(f"{fresh}."))]
    if missing or unexpected:
        raise MocohubError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def build_loaded(build: Callable[[], nn.Module], state_dict: Mapping[str, torch.Tensor], *,
                 fresh: str | None = None) -> nn.Module:
    """``build()`` holding ``state_dict``'s weights, without initialising what they replace.

    Same values, dtypes and strictness as ``load_strict(build(), state_dict, fresh=fresh)``.
    """
    with torch.device("meta"):
        model = build()
    wanted = model.state_dict()
    if wanted.keys() == state_dict.keys():
        model.load_state_dict({k: v.to(wanted[k].dtype) for k, v in state_dict.items()}, strict=True, assign=True)
        if not any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
            return model
    model = build()  # something is not in the weights: it needs its real initialisation
    load_strict(model, state_dict, fresh=fresh)
    return model
