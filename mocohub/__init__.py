"""mocohub: Momentum Contrast (MoCo v1/v2/v3) training and model zoo."""
from .algorithm import MoCo, MoCoV3
from .errors import MocohubError
from .zoo import from_pretrained, list_models, model_info, push_to_hub, save_pretrained, transform_for
from .detection import detection_backbone
from .evaluation import compute_embeddings, extract_embeddings, knn_evaluate, load_embeddings

__version__ = "0.1.0"

__all__ = ["MoCo", "MoCoV3", "MocohubError", "from_pretrained", "list_models", "model_info", "push_to_hub",
           "save_pretrained", "transform_for", "__version__",
           "detection_backbone", "compute_embeddings", "extract_embeddings", "knn_evaluate", "load_embeddings"]
