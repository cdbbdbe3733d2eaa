"""Backbone constructors."""
from .resnet import RESNET_ARCHS, STEMS, apply_cifar_stem, create_resnet
from .vit import MOCO_V3_VITS, create_vit, vit_architecture

__all__ = ["RESNET_ARCHS", "STEMS", "apply_cifar_stem", "create_resnet", "MOCO_V3_VITS", "create_vit",
           "vit_architecture"]
