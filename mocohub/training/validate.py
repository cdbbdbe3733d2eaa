"""One check of a training config against the world it runs in, before anything is written.

Every refusal is one ``MocohubError`` line naming the flag and the way out. The choices it checks
against are the CLI's ``choices`` (choices.py), so a fact has one source.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Iterable

import torch

from ..backbones import MOCO_V3_VITS, RESNET_ARCHS, vit_architecture
from ..errors import MocohubError
from .choices import CHOICES
from .config import TrainConfig
from .recipes import Recipe, recipe_flags

__all__ = ["CHOICES", "validate", "check_generation", "bn_splits_for", "compile_refusal", "available_compilers",
           "is_vit", "patch_size"]

V3_OPTIMIZERS = ("lars", "adamw")
_V3_RECIPES, _V1_RECIPES = recipe_flags(v3=True), recipe_flags(v3=False)
# flag of each v3-only field, refused on a v1/v2 run unless at its (v1) default
_V3_ONLY = {"optimizer": "--optimizer", "warmup_epochs": "--warmup-epochs", "moco_m_cos": "--moco-m-cos",
            "mlp_dim": "--mlp-dim", "stop_grad_conv1": "--stop-grad-conv1", "patch_size": "--patch-size"}
# counts that must be at least 1 (None: unset, where the field allows it)
_POSITIVE = ("epochs", "batch_size", "image_size", "moco_dim", "mlp_dim", "bn_groups", "log_every", "knn_every",
             "knn_k", "max_steps", "bn_splits", "patch_size", "micro_batch")


def flag(name: str) -> str:
    return "--wd" if name == "weight_decay" else "--" + name.replace("_", "-")


def is_vit(arch: str) -> bool:
    """MoCo v3's ``vit_small``/``vit_base``, or a timm Vision Transformer name (``vit_*``, ``test_vit*``)."""
    return arch in MOCO_V3_VITS or re.match(r"(test_)?vit", arch) is not None


def patch_size(cfg: Recipe) -> int:
    """``--patch-size``, else the one in the timm name (``..._patch16_...``), else timm's default 16."""
    if cfg.patch_size:
        return cfg.patch_size
    found = re.search(r"patch(\d+)", vit_architecture(cfg.arch)[0])
    return int(found.group(1)) if found else 16


def available_compilers() -> list[str]:
    """The C/C++ compilers on PATH ($CC and $CXX first)."""
    names = [os.environ.get("CC", ""), os.environ.get("CXX", ""), "cc", "c++", "gcc", "g++", "clang", "clang++"]
    return [n for n in dict.fromkeys(names) if n and shutil.which(n)]


def compile_refusal(device_type: str, compilers: Iterable[str]) -> str | None:
    """Why ``--compile`` cannot run on ``device_type`` with these compilers on PATH (None: it can).
    The CPU's Inductor writes C++ (``g++``, ``clang++``: a name with ``++``); on CUDA, Triton builds
    its launcher with a C compiler (``cc``, ``gcc``, ``clang``) at the first step, deep inside it."""
    names = [os.path.basename(c) for c in compilers]
    if device_type == "cpu" and not any("++" in n for n in names):
        return ("--compile on the CPU needs a C++ compiler (g++ or clang++, e.g. apt-get install g++); "
                "or drop --compile")
    if device_type == "cuda" and not any("++" not in n for n in names):
        return ("--compile on CUDA needs a C compiler for Triton (gcc or clang, e.g. apt-get install gcc); "
                "or drop --compile")
    return None


def _check_counts(cfg: TrainConfig) -> None:
    for name in _POSITIVE:
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise MocohubError(f"{flag(name)} {value}: must be a whole number of at least 1")
    if cfg.time_budget is not None and not cfg.time_budget > 0:
        raise MocohubError(f"--time-budget {cfg.time_budget} s: must be more than 0 (e.g. 90s, 30m, 6h)")
    if cfg.workers is not None and cfg.workers < 0:
        raise MocohubError(f"--workers {cfg.workers}: must be 0 (load in the training process) or more")


def _check_choices(cfg: TrainConfig) -> None:
    for name, valid in CHOICES.items():
        if getattr(cfg, name) not in valid:
            raise MocohubError(f"unknown {flag(name)} {getattr(cfg, name)!r}; valid: {', '.join(valid)}")


def _check_v1v2(cfg: Recipe) -> None:
    if is_vit(cfg.arch):
        raise MocohubError(f"--arch {cfg.arch}: MoCo v1/v2 train ResNets; a ViT needs MoCo v3 ({_V3_RECIPES})")
    if cfg.arch not in RESNET_ARCHS:
        raise MocohubError(f"unknown arch {cfg.arch!r}; valid: {', '.join(RESNET_ARCHS)}")
    default = Recipe()
    for name, name_flag in _V3_ONLY.items():
        if getattr(cfg, name) != getattr(default, name):
            raise MocohubError(f"{name_flag} applies to MoCo v3 ({_V3_RECIPES}); the {cfg.moco_version} recipe "
                               "does not use it: drop the flag")
    if cfg.moco_k < 1:
        raise MocohubError(f"--moco-k {cfg.moco_k}: the queue needs at least one key (a multiple of the batch)")


def _check_v3_arch(cfg: Recipe) -> None:
    vit = is_vit(cfg.arch)
    if not vit and cfg.arch not in RESNET_ARCHS:
        raise MocohubError(f"--arch {cfg.arch}: MoCo v3 trains a ResNet ({', '.join(RESNET_ARCHS)}) or a ViT "
                           f"({', '.join(MOCO_V3_VITS)} or a timm vit_* name)")
    patch = patch_size(cfg) if vit else 0
    if vit and cfg.image_size % patch:
        raise MocohubError(f"--image-size {cfg.image_size} is not a multiple of {cfg.arch}'s patch size {patch}: "
                           f"use e.g. --image-size {max(patch, cfg.image_size // patch * patch)}, or set --patch-size")
    if vit and cfg.stem != "imagenet":
        raise MocohubError(f"--stem {cfg.stem} applies to ResNets; a ViT's stem is its --patch-size")
    if not vit and (cfg.patch_size or cfg.stop_grad_conv1):
        raise MocohubError("--patch-size and --stop-grad-conv1 apply to a ViT --arch")


def _check_v3(cfg: Recipe, per_rank: int) -> None:
    _check_v3_arch(cfg)
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


def check_generation(cfg: Recipe, per_rank: int) -> None:
    """Refuse settings the recipe's MoCo generation cannot train, one clear message each."""
    if cfg.moco_version not in ("v1", "v2", "v3"):
        raise MocohubError(f"unknown moco_version {cfg.moco_version!r}; valid: v1, v2, v3")
    if cfg.moco_version == "v3":
        _check_v3(cfg, per_rank)
    else:
        _check_v1v2(cfg)


def bn_splits_for(cfg: TrainConfig, world: int) -> int:
    """BN sub-batches per process: v3 normalises over each process's batch (1); v1/v2 over
    ``bn_groups`` groups of the global batch, of at least 32 images each (the official 8 GPUs x 32).
    With ``--micro-batch`` the chunk is the BN unit: the splits are the chunk's (``microbatch``)."""
    per_rank = cfg.batch_size // world
    if cfg.moco_version == "v3":
        if cfg.bn_splits is not None:
            raise MocohubError("--bn-splits: MoCo v3 normalises over each process's batch (synchronised over "
                               "GPUs under DDP), not in splits: drop the flag")
        return 1
    enqueued = cfg.batch_size * (2 if cfg.symmetric else 1)  # --symmetric enqueues both views' keys
    if cfg.moco_k % enqueued:
        why = "twice the global batch size (--symmetric)" if cfg.symmetric else "the global batch size"
        raise MocohubError(f"--moco-k {cfg.moco_k} must be divisible by {why} {enqueued} (the queue advances "
                           "by the keys of a whole step)")
    unit = cfg.micro_batch or per_rank
    if cfg.bn_splits is None:
        target = max(1, cfg.bn_groups // world // (per_rank // unit))
        return max(d for d in range(1, target + 1) if unit % d == 0 and (d == 1 or unit // d >= 32))
    if unit % cfg.bn_splits:
        what = f"micro-batch {unit}" if cfg.micro_batch else f"per-process batch {unit}"
        raise MocohubError(f"the {what} is not divisible by {cfg.bn_splits} BN "
                           "splits: set --bn-splits to a divisor of it")
    return cfg.bn_splits


def validate(cfg: TrainConfig, world: int, device: torch.device | None = None) -> int:
    """Refuse an impossible run before anything is written; return the per-process BN splits.
    ``device``: this process's (for ``--compile``'s compiler)."""
    _check_counts(cfg)
    _check_choices(cfg)
    if cfg.batch_size % world:
        raise MocohubError(f"--batch-size {cfg.batch_size} is the global batch and must be divisible by "
                           f"the {world} processes")
    check_generation(cfg, cfg.batch_size // world)
    if cfg.micro_batch and (cfg.batch_size // world) % cfg.micro_batch:
        raise MocohubError(f"--micro-batch {cfg.micro_batch} does not divide the per-process batch "
                           f"{cfg.batch_size // world} (--batch-size {cfg.batch_size} over {world} process(es)): "
                           "use a divisor of it")
    if cfg.compile and device is not None:
        refusal = compile_refusal(device.type, available_compilers())
        if refusal:
            raise MocohubError(refusal)
    return bn_splits_for(cfg, world)
