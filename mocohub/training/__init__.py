"""MoCo pre-training: recipes, the loop, checkpoints."""
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .recipes import RECIPES, Recipe, get_recipe
from .trainer import Trainer, train

__all__ = ["RECIPES", "Recipe", "TrainConfig", "Trainer", "get_recipe", "load_checkpoint", "save_checkpoint", "train"]
