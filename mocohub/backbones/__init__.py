"""Backbone constructors."""
from ..lazy import lazy_exports

__all__ = ["RESNET_ARCHS", "STEMS", "apply_cifar_stem", "create_resnet", "MOCO_V3_VITS", "create_vit",
           "vit_architecture", "vit_args"]

__getattr__, __dir__ = lazy_exports(__name__, {
    ".resnet": ("RESNET_ARCHS", "STEMS", "apply_cifar_stem", "create_resnet"),
    ".vit": ("MOCO_V3_VITS", "create_vit", "vit_architecture", "vit_args"),
})
