"""Backbone constructors."""
from .resnet import RESNET_ARCHS, STEMS, apply_cifar_stem, create_resnet

__all__ = ["RESNET_ARCHS", "STEMS", "apply_cifar_stem", "create_resnet"]
