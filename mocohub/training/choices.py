"""The values each choice flag of ``mocohub train`` accepts: the CLI's ``choices`` and validate.py's checks
read them here, a module without torch, so building the parser imports none."""
from __future__ import annotations

from ..backbones.names import STEMS
from ..data.augment_names import AUGMENTATION_NAMES
from ..precision_names import PRECISION_CHOICES
from .recipes import RECIPES

__all__ = ["CHOICES"]

# field -> the values a flag of that name accepts (the CLI's ``choices``)
CHOICES: dict[str, tuple[str, ...]] = {
    "recipe": tuple(RECIPES),
    "stem": STEMS,
    "schedule": ("step", "cos"),
    "optimizer": ("sgd", "lars", "adamw"),
    "aug": AUGMENTATION_NAMES,
    "precision": PRECISION_CHOICES,
    "aug_impl": ("auto", "pil", "batched"),
    "cache_images": ("auto", "on", "off"),
}
