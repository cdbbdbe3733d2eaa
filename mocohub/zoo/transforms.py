"""The evaluation preprocessing of a loaded model, derived from the pretrained_cfg it carries."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import timm.data
import torch.nn as nn

__all__ = ["transform_for"]


def transform_for(model_or_cfg: nn.Module | Mapping[str, Any]) -> Callable:
    """timm's eval transform (resize, center crop, normalise) for a model or a pretrained_cfg."""
    if isinstance(model_or_cfg, nn.Module):
        data_cfg = timm.data.resolve_data_config(model=model_or_cfg)
    else:
        data_cfg = timm.data.resolve_data_config(pretrained_cfg=dict(model_or_cfg))
    return timm.data.create_transform(**data_cfg, is_training=False)
