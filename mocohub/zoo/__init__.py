"""The model zoo: the registry of official checkpoints and every way to load and publish them."""
from ..lazy import lazy_exports

__all__ = ["build_config", "from_pretrained", "list_models", "load_pretrained_dir", "model_info",
           "push_to_hub", "save_pretrained", "transform_for", "write_pretrained"]

__getattr__, __dir__ = lazy_exports(__name__, {
    ".hub": ("push_to_hub",),
    ".loading": ("from_pretrained",),
    ".pretrained": ("build_config", "load_pretrained_dir", "save_pretrained", "write_pretrained"),
    ".registry": ("list_models", "model_info"),
    ".transforms": ("transform_for",),
})
