"""What differs between the MoCo generations, in one place, so that one loop trains them all.

v1/v2 (``MoCo``): a queue, SGD, the official step/cosine schedule, a fixed momentum m.
v3 (``MoCoV3``): the batch's keys, LARS or AdamW at ``lr x batch/256``, linear warmup then a
per-iteration half-cosine, and (with m-cos) a momentum m computed before each step and passed
to the model, as ``main_moco.py`` does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..algorithm import MoCo, MoCoV3
from ..backbones import MOCO_V3_VITS, RESNET_ARCHS, vit_architecture
from ..errors import MocohubError
from .optim import scaled_lr, v3_lr, v3_momentum, v3_optimizer
from .recipes import Recipe
from .schedule import make_scheduler

__all__ = ["Algorithm", "build_algorithm", "check_generation", "is_vit", "vit_args", "fit_optimizer_state"]

V3_OPTIMIZERS = ("lars", "adamw")
_V3_RECIPES = "--recipe moco-v3, moco-v3-vit or cifar-v3"
_V1_RECIPES = "--recipe moco-v1, moco-v2 or cifar"
# flag of each v3-only field, refused on a v1/v2 run unless at its (v1) default
_V3_ONLY = {"optimizer": "--optimizer", "warmup_epochs": "--warmup-epochs", "moco_m_cos": "--moco-m-cos",
            "mlp_dim": "--mlp-dim", "stop_grad_conv1": "--stop-grad-conv1", "patch_size": "--patch-size"}


def is_vit(arch: str) -> bool:
    """MoCo v3's ``vit_small``/``vit_base``, or a timm Vision Transformer name (``vit_*``, ``test_vit*``)."""
    return arch in MOCO_V3_VITS or re.match(r"(test_)?vit", arch) is not None


def vit_args(image_size: int, patch_size: int | None) -> dict[str, Any]:
    """timm arguments of a ViT trained at ``image_size`` (its position embedding follows the grid)."""
    return {"img_size": image_size, **({"patch_size": patch_size} if patch_size else {})}


def _patch_size(cfg: Recipe) -> int:
    """``--patch-size``, else the one in the timm name (``..._patch16_...``), else timm's default 16."""
    if cfg.patch_size:
        return cfg.patch_size
    found = re.search(r"patch(\d+)", vit_architecture(cfg.arch)[0])
    return int(found.group(1)) if found else 16


def check_generation(cfg: Recipe, per_rank: int) -> None:
    """Refuse settings the recipe's MoCo generation cannot train, one clear message each."""
    if cfg.moco_version not in ("v1", "v2", "v3"):
        raise MocohubError(f"unknown moco_version {cfg.moco_version!r}; valid: v1, v2, v3")
    if cfg.moco_version != "v3":
        if is_vit(cfg.arch):
            raise MocohubError(f"--arch {cfg.arch}: MoCo v1/v2 train ResNets; a ViT needs MoCo v3 ({_V3_RECIPES})")
        if cfg.arch not in RESNET_ARCHS:
            raise MocohubError(f"unknown arch {cfg.arch!r}; valid: {', '.join(RESNET_ARCHS)}")
        default = Recipe()
        for name, flag in _V3_ONLY.items():
            if getattr(cfg, name) != getattr(default, name):
                raise MocohubError(f"{flag} applies to MoCo v3 ({_V3_RECIPES}); the {cfg.moco_version} recipe "
                                   "does not use it: drop the flag")
        return
    vit = is_vit(cfg.arch)
    if not vit and cfg.arch not in RESNET_ARCHS:
        raise MocohubError(f"--arch {cfg.arch}: MoCo v3 trains a ResNet ({', '.join(RESNET_ARCHS)}) or a ViT "
                           f"({', '.join(MOCO_V3_VITS)} or a timm vit_* name)")
    patch = _patch_size(cfg) if vit else 0
    if vit and cfg.image_size % patch:
        raise MocohubError(f"--image-size {cfg.image_size} is not a multiple of {cfg.arch}'s patch size {patch}: "
                           f"use e.g. --image-size {max(patch, cfg.image_size // patch * patch)}, or set --patch-size")
    if vit and cfg.stem != "imagenet":
        raise MocohubError(f"--stem {cfg.stem} applies to ResNets; a ViT's stem is its --patch-size")
    if not vit and (cfg.patch_size or cfg.stop_grad_conv1):
        raise MocohubError("--patch-size and --stop-grad-conv1 apply to a ViT --arch")
    if cfg.optimizer not in V3_OPTIMIZERS:
        raise MocohubError(f"--optimizer {cfg.optimizer}: MoCo v3 trains with {' or '.join(V3_OPTIMIZERS)}")
    if cfg.moco_k:
        raise MocohubError("--moco-k: MoCo v3 has no queue (the other view's keys in the batch are the "
                           "negatives): drop the flag")
    if not cfg.symmetric:
        raise MocohubError("--symmetric false: MoCo v3's loss is symmetric by design: drop the flag")
    if not getattr(cfg, "shuffle_bn", True):
        raise MocohubError("--shuffle-bn false: MoCo v3 has no Shuffle BN to turn off (it normalises over each "
                           "process's batch, SyncBN over GPUs); the ablation is a v1/v2 one "
                           f"({_V1_RECIPES}): drop the flag")
    if cfg.schedule != "cos" or cfg.lr_steps:
        raise MocohubError("--schedule/--lr-steps: MoCo v3's lr is a linear warmup then a half-cosine; set its "
                           "length with --warmup-epochs")
    if cfg.warmup_epochs < 0 or cfg.warmup_epochs >= cfg.epochs:
        raise MocohubError(f"--warmup-epochs {cfg.warmup_epochs} must be at least 0 and below --epochs {cfg.epochs}")
    if per_rank < 2:
        raise MocohubError(f"a batch of {per_rank} image(s) per process is too small: MoCo v3's projector "
                           "normalises over the batch (BatchNorm1d) and needs at least 2 per process: raise "
                           "--batch-size")


def _scheduled(cfg: Recipe, optimizer: torch.optim.Optimizer, steps_per_epoch: int, per_iteration: bool
               ) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over steps (the trainer's resume sets ``base_lrs`` and recomputes ``lr_lambdas``)."""
    if cfg.moco_version != "v3":
        return make_scheduler(optimizer, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, schedule=cfg.schedule,
                              milestones=cfg.lr_steps, per_iteration=per_iteration)
    # main_moco.py adjusts the lr every iteration at epoch + i / iters_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: v3_lr(step / steps_per_epoch, cfg.epochs, cfg.warmup_epochs, 1.0))


@dataclass
class Algorithm:
    """A generation's model, optimiser and per-step schedules, behind one call."""

    model: MoCo | MoCoV3
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    peak_lr: float                 # what the lr schedule multiplies
    hyper: dict[str, float]        # the optimiser settings this run's flags set (also on resume)
    steps_per_epoch: int
    epochs: int
    moco_m: float
    moco_m_cos: bool

    @property
    def v3(self) -> bool:
        return isinstance(self.model, MoCoV3)

    @property
    def query_encoder(self) -> nn.Module:
        """Backbone plus projector: what the kNN monitor embeds (``moco_dim`` features)."""
        return self.model.base_encoder if self.v3 else self.model.encoder_q

    @property
    def encoders(self) -> tuple[nn.Module, nn.Module]:
        return ((self.model.base_encoder, self.model.momentum_encoder) if self.v3
                else (self.model.encoder_q, self.model.encoder_k))

    def momentum(self, step: int) -> float | None:
        """v3's m for ``step`` (computed on the host before the step, as main_moco.py); None for v1/v2,
        whose m is fixed inside the model."""
        if not self.v3:
            return None
        return v3_momentum(step / self.steps_per_epoch, self.epochs, self.moco_m) if self.moco_m_cos else self.moco_m

    def forward(self, net: nn.Module, x1: torch.Tensor, x2: torch.Tensor, m: float | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``loss, logits, labels`` of one step; ``net`` is the model or its DDP wrapper."""
        if self.v3:
            return net(x1, x2, m, return_logits=True)
        return net(x1, x2, return_loss=True)


def build_algorithm(cfg: Any, *, steps_per_epoch: int, bn_splits: int, device: torch.device,
                    sync_bn: bool) -> Algorithm:
    """The model (on ``device``; SyncBatchNorm when ``sync_bn`` and the generation wants it), its
    optimiser and lr schedule, from a checked config (``check_generation``)."""
    if cfg.moco_version == "v3":
        args = vit_args(cfg.image_size, cfg.patch_size) if is_vit(cfg.arch) else {}
        model: MoCo | MoCoV3 = MoCoV3(cfg.arch, cfg.moco_dim, cfg.mlp_dim, cfg.moco_t, stem=cfg.stem,
                                      stop_grad_conv1=cfg.stop_grad_conv1, **args)
    else:
        model = MoCo(cfg.arch, cfg.moco_dim, cfg.moco_k, cfg.moco_m, cfg.moco_t, cfg.mlp, stem=cfg.stem,
                     bn_splits=bn_splits, symmetric=cfg.symmetric, shuffle_bn=getattr(cfg, "shuffle_bn", True))
    if sync_bn and model.sync_bn:  # as the official v3 under DDP; torch's SyncBatchNorm needs CUDA tensors
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if cfg.moco_version == "v3":
        hyper = {"weight_decay": cfg.weight_decay, **({"momentum": cfg.momentum} if cfg.optimizer == "lars" else {})}
        peak = scaled_lr(cfg.lr, cfg.batch_size)
        optimizer = v3_optimizer(model.parameters(), cfg.optimizer, peak, **hyper)
    else:
        hyper = {"weight_decay": cfg.weight_decay, "momentum": cfg.momentum}
        peak = cfg.lr
        optimizer = torch.optim.SGD(model.parameters(), peak, **hyper)
    scheduler = _scheduled(cfg, optimizer, steps_per_epoch, getattr(cfg, "lr_per_iteration", False))
    return Algorithm(model, optimizer, scheduler, peak, hyper, steps_per_epoch, cfg.epochs, cfg.moco_m,
                     cfg.moco_m_cos)


def fit_optimizer_state(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An official v3 optimizer state lists every parameter (the momentum encoder's too, which never
    get a gradient); ours lists the trainable ones. Renumber an official one to ours."""
    groups = state.get("param_groups", [])
    params = list(model.parameters())
    if len(groups) != 1 or len(optimizer.param_groups) != 1 or len(groups[0]["params"]) != len(params) \
            or len(params) == len(optimizer.param_groups[0]["params"]):
        return state
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    new_index = {groups[0]["params"][old]: new for new, old in enumerate(trainable)}
    return {"state": {new_index[k]: v for k, v in state["state"].items() if k in new_index},
            "param_groups": [{**groups[0], "params": list(range(len(trainable)))}]}

