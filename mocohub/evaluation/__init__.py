"""Evaluation of frozen backbones: embeddings, extraction to files, weighted kNN, linear probes."""
from .embeddings import Embeddings, compute_embeddings, concat_embeddings
from .extract import extract_embeddings, load_embeddings
from .knn import knn_classify, knn_evaluate, knn_predict, topk_accuracy
from .linear import fast_linear_probe, resolve_protocol, train_linear_head

__all__ = ["Embeddings", "compute_embeddings", "concat_embeddings", "extract_embeddings", "load_embeddings",
           "knn_classify", "knn_evaluate", "knn_predict", "topk_accuracy", "fast_linear_probe",
           "resolve_protocol", "train_linear_head"]
