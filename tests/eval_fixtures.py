"""Generated image folders for the evaluation, detection and example tests (no downloads)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["COLOURS", "make_image_folder", "tiny_resnet"]

COLOURS = ((220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40))


def make_image_folder(root: Path, *, num_classes: int = 3, per_class: int = 8, size: int = 16,
                      seed: int = 0, labelled: bool = True) -> Path:
    """Classes are colours plus noise: separable by any reasonable feature extractor."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        folder = root / f"class{c}" if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.array(COLOURS[c], dtype=np.float32) + rng.normal(0, 25, (size, size, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"c{c}_{i:03d}.png")
    return root


def tiny_resnet(**kwargs):
    """A random ResNet-18 with the CIFAR stem and the eval config of a 16-px model."""
    import torch

    from mocohub.zoo.pretrained import build_config, build_model, pretrained_cfg_for

    torch.manual_seed(0)
    config = build_config("resnet18", num_features=512, stem="cifar", pretrained_cfg=pretrained_cfg_for(16))
    return build_model(dict(config, **kwargs)).eval()
