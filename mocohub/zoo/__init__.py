"""The model zoo: the registry of official checkpoints and every way to load and publish them."""
from .pretrained import build_config, load_pretrained_dir, save_pretrained

__all__ = ["build_config", "load_pretrained_dir", "save_pretrained"]
