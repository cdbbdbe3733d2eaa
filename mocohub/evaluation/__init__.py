"""Evaluation of frozen backbones: embeddings, weighted kNN, linear probes."""
from .embeddings import Embeddings, compute_embeddings
from .knn import knn_classify, knn_evaluate, knn_predict, topk_accuracy

__all__ = ["Embeddings", "compute_embeddings", "knn_classify", "knn_evaluate", "knn_predict", "topk_accuracy"]
