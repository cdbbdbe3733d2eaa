"""MoCo pre-training: recipes, the loop, checkpoints."""
from ..lazy import lazy_exports

__all__ = ["RECIPES", "Recipe", "TrainConfig", "Trainer", "get_recipe", "load_checkpoint", "save_checkpoint", "train"]

__getattr__, __dir__ = lazy_exports(__name__, {
    ".checkpoint": ("load_checkpoint", "save_checkpoint"),
    ".config": ("TrainConfig",),
    ".recipes": ("RECIPES", "Recipe", "get_recipe"),
    ".trainer": ("Trainer", "train"),
})
