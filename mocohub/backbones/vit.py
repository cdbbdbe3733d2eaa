"""MoCo v3's Vision Transformer, as timm's ``VisionTransformer`` with the paper's three changes.

Chen, Xie, He (ICCV 2021), section 4 and the official ``vits.py``: a fixed 2D sin-cos position
embedding (zero for the class token), Q/K/V initialised as three separate matrices with xavier-style
bounds, and optionally a frozen random patch projection ("stop_grad_conv1"), which stabilises training.
Everything else is timm's model, so an exported backbone is a plain timm ViT whose state dict
carries the sin-cos values in ``pos_embed``.
"""
from __future__ import annotations

import math
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed

from ..errors import MocohubError
from .names import MOCO_V3_VITS, vit_architecture

__all__ = ["MOCO_V3_VITS", "create_vit", "vit_architecture", "vit_args"]


def vit_args(image_size: int, patch_size: int | None) -> dict[str, Any]:
    """timm arguments of a ViT trained at ``image_size`` (its position embedding follows the grid)."""
    return {"img_size": image_size, **({"patch_size": patch_size} if patch_size else {})}


@torch.no_grad()
def _init_moco_v3_(model: nn.Module) -> None:
    """Sin-cos position embedding and the patch projection's init (timm's ``weight_init="moco"``
    has already set the Linear layers and the class token)."""
    grid, dim = model.patch_embed.grid_size, model.embed_dim
    # The official meshgrid is (w, h) with "ij" indexing: timm's reverse_coord; sin,cos per axis: interleaved.
    pos = build_sincos2d_pos_embed(list(grid), dim, temperature=10000.0, reverse_coord=True,
                                   interleave_sin_cos=True)
    prefix = model.pos_embed.shape[1] - pos.shape[0]  # the class token's slot stays zero
    model.pos_embed.zero_()
    model.pos_embed[0, prefix:] = pos.to(model.pos_embed.dtype)
    model.pos_embed.requires_grad_(False)
    proj = model.patch_embed.proj
    val = math.sqrt(6.0 / float(proj.weight[0].numel() + dim))  # xavier over the flattened patch
    nn.init.uniform_(proj.weight, -val, val)
    nn.init.zeros_(proj.bias)


def create_vit(arch: str, *, num_classes: int = 0, stop_grad_conv1: bool = False, **kwargs: Any) -> nn.Module:
    """A randomly initialised ViT as MoCo v3 trains it: ``vit_small``/``vit_base`` or any timm ViT name.

    ``kwargs`` go to timm (``img_size``, ``patch_size``, ``depth``, ...). ``stop_grad_conv1`` freezes the
    random patch projection, as the official ViT recipe does.
    """
    timm_arch, model_args = vit_architecture(arch, **kwargs)
    if not timm.is_model(timm_arch):
        raise MocohubError(f"unknown ViT {arch!r}: use vit_small, vit_base or a timm ViT name")
    model = timm.create_model(timm_arch, pretrained=False, num_classes=num_classes, weight_init="moco", **model_args)
    embed = getattr(model, "patch_embed", None)
    if getattr(model, "pos_embed", None) is None or not isinstance(getattr(embed, "proj", None), nn.Conv2d):
        raise MocohubError(f"{arch} is not a ViT with a patch embedding and a position embedding")
    if any(i % p for i, p in zip(embed.img_size, embed.patch_size)):
        raise MocohubError(f"image size {tuple(embed.img_size)} is not a multiple of the patch size "
                           f"{tuple(embed.patch_size)}: choose an image size divisible by the patch size")
    if model.embed_dim % 4:
        raise MocohubError(f"the 2D sin-cos position embedding needs an embed dim divisible by 4, got {model.embed_dim}")
    _init_moco_v3_(model)
    if stop_grad_conv1:
        embed.proj.requires_grad_(False)
    return model
