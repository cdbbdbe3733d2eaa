"""The official hyper-parameters, one recipe per paper setting; every CLI flag defaults to these."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["Recipe", "RECIPES", "get_recipe"]


@dataclass(frozen=True)
class Recipe:
    arch: str = "resnet50"
    stem: str = "imagenet"
    epochs: int = 200
    batch_size: int = 256          # global, over all ranks
    lr: float = 0.03               # for batch_size; scale linearly when changing it
    schedule: str = "step"         # "step" (x0.1 at lr_steps) or "cos"
    lr_steps: tuple[int, ...] = (120, 160)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    moco_dim: int = 128
    moco_k: int = 65536
    moco_m: float = 0.999
    moco_t: float = 0.07
    mlp: bool = False
    aug: str = "moco-v1"
    image_size: int = 224
    crop_min: float | None = None  # RandomResizedCrop's smallest area; None: the augmentation's own
    bn_groups: int = 8             # BN statistics over batch/8 images: the official 8 GPUs x 32
    moco_version: str = "v1"
    paper: str = "He et al., Momentum Contrast for Unsupervised Visual Representation Learning, CVPR 2020"

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


_V1 = Recipe()
RECIPES: dict[str, Recipe] = {
    "moco-v1": _V1,
    "moco-v2": replace(_V1, schedule="cos", moco_t=0.2, mlp=True, aug="moco-v2", moco_version="v2",
                       paper="Chen et al., Improved Baselines with Momentum Contrastive Learning, 2020"),
    # The official CIFAR-10 demo (colab notebook in facebookresearch/moco).
    "cifar": replace(_V1, arch="resnet18", stem="cifar", batch_size=512, lr=0.06, schedule="cos",
                     weight_decay=5e-4, moco_k=4096, moco_m=0.99, moco_t=0.1, aug="cifar", image_size=32,
                     moco_version="v1", paper="facebookresearch/moco CIFAR-10 demo"),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    return RECIPES[name]
