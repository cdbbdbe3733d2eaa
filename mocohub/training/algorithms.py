"""What differs between the MoCo generations, decided once, so that one loop trains them all.

v1/v2 (``MoCo``): a queue, SGD, the official step/cosine schedule, a fixed momentum m.
v3 (``MoCoV3``): the batch's keys, LARS or AdamW at ``lr x batch/256``, linear warmup then a
per-iteration half-cosine, and (with m-cos) a momentum m computed before each step, as
``main_moco.py`` does. Both models answer the same calls, so ``Algorithm`` only holds the
schedules: the lr and m of each step are functions of the step, set before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from ..algorithm import MoCo, MoCoV3
from ..backbones import vit_args
from .optim import scaled_lr, v3_lr, v3_momentum, v3_optimizer
from .schedule import lr_schedule
from .validate import is_vit

__all__ = ["Algorithm", "build_algorithm", "schedules", "fit_optimizer_state"]


@dataclass
class Algorithm:
    """A generation's model, optimiser and per-step schedules, behind one call."""

    model: MoCo | MoCoV3
    optimizer: torch.optim.Optimizer
    peak_lr: float                     # what the lr factor multiplies
    lr_factor: Callable[[int], float]  # step -> factor of peak_lr
    momentum: Callable[[int], float]   # step -> the key encoder's m
    hyper: dict[str, float]            # the optimiser settings this run's flags set (also on resume)
    summary: str                       # the recipe in words, for the start line
    batch_norm: str                    # what BN normalises over, in words

    def schedule(self, step: int) -> dict[str, float]:
        """Set the optimiser's lr for ``step`` (a function of the step alone, so a resumed run seeks
        by calling it) and return ``{"lr", "moco_m"}`` of the step."""
        lr = self.peak_lr * self.lr_factor(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return {"lr": lr, "moco_m": self.momentum(step)}

    def reschedule(self, cfg: Any, steps_per_epoch: int) -> None:
        """The schedules over ``cfg.epochs`` from now on (a ``--time-budget`` run's new plan)."""
        self.lr_factor, self.momentum = schedules(cfg, steps_per_epoch)

    def forward(self, net: nn.Module, x1: torch.Tensor, x2: torch.Tensor, m: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``loss, logits, labels`` of one step; ``net`` is the model or its DDP wrapper."""
        return net(x1, x2, m, return_loss=True)


# what each generation's builder returns: model, optimiser settings, peak lr, two descriptions
_Parts = tuple[nn.Module, dict, float, str, str]


def schedules(cfg: Any, steps_per_epoch: int) -> tuple[Callable[[int], float], Callable[[int], float]]:
    """The lr factor and the key encoder's m of each step over ``cfg.epochs`` (built again when a
    ``--time-budget`` run re-plans its epochs)."""
    if cfg.moco_version != "v3":
        return lr_schedule(epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, schedule=cfg.schedule,
                           milestones=cfg.lr_steps, per_iteration=getattr(cfg, "lr_per_iteration", False)), \
            lambda step: cfg.moco_m

    def factor(step: int) -> float:  # main_moco.py adjusts the lr every iteration at epoch + i / iters
        return v3_lr(step / steps_per_epoch, cfg.epochs, cfg.warmup_epochs, 1.0)

    def momentum(step: int) -> float:  # computed on the host before the step, as main_moco.py
        return v3_momentum(step / steps_per_epoch, cfg.epochs, cfg.moco_m) if cfg.moco_m_cos else cfg.moco_m
    return factor, momentum


def _moco(cfg: Any, bn_splits: int) -> _Parts:
    model = MoCo(cfg.arch, cfg.moco_dim, cfg.moco_k, cfg.moco_m, cfg.moco_t, cfg.mlp, stem=cfg.stem,
                 bn_splits=bn_splits, symmetric=cfg.symmetric, shuffle_bn=getattr(cfg, "shuffle_bn", True))
    hyper = {"weight_decay": cfg.weight_decay, "momentum": cfg.momentum}
    summary = f"MoCo, {cfg.recipe} recipe ({'MLP' if cfg.mlp else 'linear'} head, T {cfg.moco_t}" \
              f"{', symmetric' if cfg.symmetric else ''})"
    shuffle = "" if model.shuffle_bn else " without Shuffle BN (the ablation)"
    batch_norm = f"K {cfg.moco_k}, BN in {bn_splits} group(s) per process{shuffle}"
    return model, hyper, cfg.lr, summary, batch_norm


def _moco_v3(cfg: Any, sync_bn: bool) -> _Parts:
    args = vit_args(cfg.image_size, cfg.patch_size) if is_vit(cfg.arch) else {}
    model = MoCoV3(cfg.arch, cfg.moco_dim, cfg.mlp_dim, cfg.moco_t, stem=cfg.stem,
                   stop_grad_conv1=cfg.stop_grad_conv1, **args)
    hyper = {"weight_decay": cfg.weight_decay, **({"momentum": cfg.momentum} if cfg.optimizer == "lars" else {})}
    peak = scaled_lr(cfg.lr, cfg.batch_size)
    m = f"m {cfg.moco_m}{' rising to 1 (m-cos)' if cfg.moco_m_cos else ''}"
    summary = (f"MoCo v3, {cfg.recipe} recipe ({cfg.optimizer}, lr {peak:g} after {cfg.warmup_epochs} warmup "
               f"epochs, T {cfg.moco_t}, {m})")
    batch_norm = f"{'SyncBatchNorm' if sync_bn else 'BN'} over each process's batch"
    return model, hyper, peak, summary, batch_norm


def build_algorithm(cfg: Any, *, steps_per_epoch: int, bn_splits: int, device: torch.device,
                    sync_bn: bool) -> Algorithm:
    """The model (on ``device``; SyncBatchNorm when ``sync_bn`` and the generation wants it), its
    optimiser and schedules, from a validated config (``validate.validate``)."""
    v3 = cfg.moco_version == "v3"
    model, hyper, peak, summary, batch_norm = _moco_v3(cfg, sync_bn) if v3 else _moco(cfg, bn_splits)
    if sync_bn and model.sync_bn:  # as the official v3 under DDP; torch's SyncBatchNorm needs CUDA tensors
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    optimizer = v3_optimizer(model.parameters(), cfg.optimizer, peak, **hyper) if v3 else \
        torch.optim.SGD(model.parameters(), peak, **hyper)
    algo = Algorithm(model, optimizer, peak, *schedules(cfg, steps_per_epoch), hyper, summary, batch_norm)
    algo.schedule(0)
    return algo


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
