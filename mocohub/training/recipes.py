"""The official hyper-parameters, one recipe per paper setting; every CLI flag defaults to these."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["Recipe", "RECIPES", "get_recipe", "recipe_flags"]


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
    moco_version: str = "v1"       # "v1"/"v2": queue of negatives (MoCo); "v3": the batch's keys (MoCoV3)
    symmetric: bool = False        # v1/v2: also contrast the swapped views (K a multiple of 2x batch); v3 always is
    shuffle_bn: bool = True        # v1/v2: keys on a shuffled batch (Shuffle BN); False: the ablation (v3: none)
    # MoCo v3 only (v1/v2 keep these defaults)
    optimizer: str = "sgd"         # v1/v2: sgd; v3: lars (ResNet) or adamw (ViT)
    warmup_epochs: int = 0         # v3: linear warmup, then a per-iteration half-cosine
    moco_m_cos: bool = False       # v3: raise m from moco_m to 1 along a half-cosine
    mlp_dim: int = 4096            # v3: hidden width of the projector and predictor
    stop_grad_conv1: bool = False  # v3 ViT: freeze the random patch projection
    patch_size: int | None = None  # v3 ViT: the patch size (None: the architecture's own, 16)
    paper: str = "He et al., Momentum Contrast for Unsupervised Visual Representation Learning, CVPR 2020"

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


_V1 = Recipe()
_V3 = replace(_V1, epochs=100, batch_size=4096, lr=0.6, schedule="cos", lr_steps=(), weight_decay=1e-6,
              moco_dim=256, moco_k=0, moco_m=0.99, moco_t=1.0, mlp=True, aug="moco-v3", crop_min=0.2,
              moco_version="v3", symmetric=True, optimizer="lars", warmup_epochs=10, moco_m_cos=True,
              paper="Chen, Xie, He, An Empirical Study of Training Self-Supervised Vision Transformers, ICCV 2021")
# The official CIFAR-10 demo (colab notebook in facebookresearch/moco).
_CIFAR = replace(_V1, arch="resnet18", stem="cifar", batch_size=512, lr=0.06, schedule="cos", weight_decay=5e-4,
                 moco_k=4096, moco_m=0.99, moco_t=0.1, aug="cifar", image_size=32, moco_version="v1",
                 paper="facebookresearch/moco CIFAR-10 demo")
RECIPES: dict[str, Recipe] = {
    "moco-v1": _V1,
    "moco-v2": replace(_V1, schedule="cos", moco_t=0.2, mlp=True, aug="moco-v2", moco_version="v2",
                       paper="Chen et al., Improved Baselines with Momentum Contrastive Learning, 2020"),
    # The released 100-epoch ResNet-50 (main_moco.py --moco-m-cos --crop-min=.2). `lr` is MoCo v3's
    # *base* lr, for 256 images: the trainer uses lr x batch/256, as main_moco.py. 300 epochs:
    # --epochs 300 --lr 0.3; 1000 epochs: --epochs 1000 --lr 0.3 --wd 1.5e-6 --moco-m 0.996.
    "moco-v3": _V3,
    # ViT-Small, 300 epochs: AdamW, frozen patch projection, T 0.2 (the paper's ViT-S/B recipe).
    "moco-v3-vit": replace(_V3, arch="vit_small", epochs=300, lr=1.5e-4, weight_decay=0.1, optimizer="adamw",
                           warmup_epochs=40, moco_t=0.2, crop_min=0.08, stop_grad_conv1=True),
    # A 32-px MoCo v3 for CPUs and tests; there is no official one. Every MoCo v3 value is the released
    # ResNet-50's (LARS, base lr 0.6 scaled by batch/256 -> 1.2, wd 1e-6, warmup 10, m 0.99 m-cos, T 1.0,
    # dim 256, mlp 4096, crop-min 0.2, its two different views); what the small images demand is the
    # CIFAR demo's: ResNet-18 with the 3x3 stem, 32 px, batch 512, 200 epochs.
    "cifar-v3": replace(_V3, arch="resnet18", stem="cifar", epochs=200, batch_size=512, image_size=32,
                        paper="MoCo v3's ResNet recipe at CIFAR scale (mocohub)"),
    "cifar": _CIFAR,
    # mocohub's, for CPUs and a --time-budget (issue 23): chosen on 5,000 images held out of CIFAR-10's
    # training set for the most kNN accuracy per CPU-minute on 2 cores (benchmarks/README.md, "Choosing
    # the CPU recipe"): resnet10t at half width (3x3 stem, 256 features) runs 5x the epochs of the demo's
    # ResNet-18; in 30 minutes it ends level with test_resnet (0.4 M parameters, 96 features), ahead of it at
    # every epoch, with 3.3x the parameters for longer budgets. Batch 256 at the demo's lr per image (0.03),
    # v2's MLP head, T 0.2.
    "cifar-cpu": replace(_CIFAR, arch="resnet10t_half", batch_size=256, lr=0.03, mlp=True, moco_t=0.2,
                         paper="mocohub's CPU recipe (the CIFAR-10 demo's values otherwise)"),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def recipe_flags(v3: bool) -> str:
    """``--recipe A, B or C``: the recipes of one MoCo generation, for messages that point to them."""
    names = [name for name, r in RECIPES.items() if (r.moco_version == "v3") == v3]
    return f"--recipe {', '.join(names[:-1])} or {names[-1]}"
