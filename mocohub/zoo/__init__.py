"""The model zoo: the registry of official checkpoints and every way to load and publish them."""
from .hub import push_to_hub
from .loading import from_pretrained
from .pretrained import build_config, load_pretrained_dir, save_pretrained, write_pretrained
from .registry import list_models, model_info
from .transforms import transform_for

__all__ = ["build_config", "from_pretrained", "list_models", "load_pretrained_dir", "model_info",
           "push_to_hub", "save_pretrained", "transform_for", "write_pretrained"]
