"""The file names and preprocessing settings of an exported model, and the hub prefix: what the registry
and the parsers read, apart from the torch code that writes and loads models (pretrained.py, hub.py)."""
from __future__ import annotations

from typing import Any

from ..data.norms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "IMAGENET_PRETRAINED_CFG", "HUB_PREFIX"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HUB_PREFIX = "hf-hub:"

# The official linear evaluation: Resize(256) + CenterCrop(224), bilinear.
IMAGENET_PRETRAINED_CFG: dict[str, Any] = {
    "input_size": [3, 224, 224], "crop_pct": 0.875, "crop_mode": "center",
    "interpolation": "bilinear", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
    "first_conv": "conv1", "classifier": "fc",
}
