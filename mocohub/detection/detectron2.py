"""MoCo ResNet weights in detectron2's layout (the official ``convert-pretrain-to-detectron2.py`` rules)."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..errors import MocohubError
from ..zoo.loading import resolve_source
from ..fileio import atomic_write

__all__ = ["detectron2_key", "to_detectron2", "convert_to_detectron2"]

QUERY_PREFIX = "module.encoder_q."  # an official v1/v2 pre-training checkpoint


def detectron2_key(key: str) -> str:
    """torchvision ResNet name -> detectron2 name: stem.*, res2..res5, convN.norm, shortcut(.norm)."""
    if "layer" not in key:
        key = "stem." + key
    for i in (1, 2, 3, 4):
        key = key.replace(f"layer{i}", f"res{i + 1}")
    for i in (1, 2, 3):
        key = key.replace(f"bn{i}", f"conv{i}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def to_detectron2(state_dict: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Rename a ResNet backbone's weights for detectron2, values unchanged (as numpy arrays).

    Accepts torchvision names or an official checkpoint's ``module.encoder_q.*`` (other keys,
    key encoder and queue, are ignored). The classifier/projection head ``fc.*`` is dropped:
    the official script keeps it as a stray ``stem.fc.*`` that detectron2 only warns about.
    """
    if any(k.startswith(QUERY_PREFIX) for k in state_dict):
        state_dict = {k[len(QUERY_PREFIX):]: v for k, v in state_dict.items() if k.startswith(QUERY_PREFIX)}
    if "conv1.weight" not in state_dict or not any(k.startswith("layer4.") for k in state_dict):
        raise MocohubError("not a ResNet backbone (no conv1.weight / layer4.*): only ResNets convert to detectron2")
    return {detectron2_key(k): v.detach().cpu().numpy() for k, v in state_dict.items()
            if not k.startswith("fc.")}


def convert_to_detectron2(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``out`` (.pkl) for detectron2's ``MODEL.WEIGHTS`` from any source mocohub loads.

    Use it with the MoCo detection configs: RGB input, pixel mean [123.675, 116.280, 103.530],
    std [58.395, 57.120, 57.375], SyncBN in backbone and heads, nothing frozen.
    """
    backbone = resolve_source(str(source))
    stem = backbone.config.get("mocohub", {}).get("stem", "imagenet")
    if stem != "imagenet":
        raise MocohubError(f"{source} has the {stem} stem (3x3 conv, no max-pool), which detectron2's ResNet "
                           "cannot build: convert a model with the ImageNet stem")
    payload = {"model": to_detectron2(backbone.state_dict), "__author__": "MOCO", "matching_heuristics": True}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: Path(p).write_bytes(pickle.dumps(payload)))
    return out
