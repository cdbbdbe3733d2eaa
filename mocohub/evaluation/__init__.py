"""Evaluation of frozen backbones: embeddings, extraction to files, weighted kNN, linear probes."""
from ..lazy import lazy_exports

__all__ = ["Embeddings", "compute_embeddings", "concat_embeddings", "extract_embeddings", "load_embeddings",
           "knn_classify", "knn_evaluate", "knn_predict", "topk_accuracy", "fast_linear_probe",
           "resolve_protocol", "train_linear_head", "evaluate_protocols"]

__getattr__, __dir__ = lazy_exports(__name__, {
    ".embeddings": ("Embeddings", "compute_embeddings", "concat_embeddings"),
    ".extract": ("extract_embeddings", "load_embeddings"),
    ".knn": ("knn_classify", "knn_evaluate", "knn_predict", "topk_accuracy"),
    ".linear": ("fast_linear_probe", "resolve_protocol", "train_linear_head"),
    ".protocols": ("evaluate_protocols",),
})
