"""mocohub: Momentum Contrast (MoCo v1/v2/v3) training and model zoo.

The public names are imported on first use (``mocohub.lazy``), so the command line starts without torch.
"""
from .lazy import lazy_exports

__version__ = "0.1.0"

__all__ = ["train", "Run", "MoCo", "MoCoV3", "MocohubError", "from_pretrained", "list_models", "model_info", "push_to_hub",
           "save_pretrained", "transform_for", "__version__",
           "detection_backbone", "compute_embeddings", "extract_embeddings", "knn_evaluate", "load_embeddings"]

__getattr__, __dir__ = lazy_exports(__name__, {
    ".api": ("train", "Run"),
    ".algorithm": ("MoCo", "MoCoV3"),
    ".errors": ("MocohubError",),
    ".zoo": ("from_pretrained", "list_models", "model_info", "push_to_hub", "save_pretrained", "transform_for"),
    ".detection": ("detection_backbone",),
    ".evaluation": ("compute_embeddings", "extract_embeddings", "knn_evaluate", "load_embeddings"),
})
