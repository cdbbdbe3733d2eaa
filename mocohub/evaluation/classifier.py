"""Write backbone + trained linear head as one mocohub export folder (config num_classes=N)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch.nn as nn

from ..errors import MocohubError
from ..zoo.pretrained import write_pretrained

__all__ = ["save_classifier"]


def save_classifier(backbone: nn.Module, head: nn.Linear, out_dir: str | os.PathLike, *,
                    classes: Sequence[str] | None = None, metrics: Mapping[str, Any] | None = None) -> Path:
    """Save so that ``from_pretrained(out_dir, num_classes=N)`` gives backbone and head in one model.

    The head goes under the model's classifier name (``fc`` for ResNets), as timm expects.
    """
    config = getattr(backbone, "mocohub_config", None)
    if not config:
        raise MocohubError("the backbone carries no mocohub config (load it with mocohub.from_pretrained "
                           "or build it with mocohub.zoo.pretrained.build_model) so its head cannot be saved")
    classifier = config.get("pretrained_cfg", {}).get("classifier", "fc")
    num_classes = head.out_features
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith(f"{classifier}.")}
    state[f"{classifier}.weight"] = head.weight
    state[f"{classifier}.bias"] = head.bias
    pretrained_cfg = dict(getattr(backbone, "pretrained_cfg", config.get("pretrained_cfg", {})),
                          num_classes=num_classes)
    extra = dict(config.get("mocohub", {}))
    if classes is not None:
        extra["classes"] = list(classes)
    if metrics is not None:
        extra["linear_eval"] = dict(metrics)
    config = dict(config, num_classes=num_classes, pretrained_cfg=pretrained_cfg, mocohub=extra)
    return write_pretrained(out_dir, state, config)
