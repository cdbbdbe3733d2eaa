"""Weighted kNN and embeddings: hand-computed votes and a separable generated dataset."""
import math

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from eval_fixtures import make_image_folder, tiny_resnet
from mocohub.data.folder import ImageFolder, collate_images
from mocohub.errors import MocohubError
from mocohub.evaluation import compute_embeddings, knn_evaluate, knn_predict, topk_accuracy

BANK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
BANK_LABELS = torch.tensor([0, 1, 1])


def test_knn_votes_are_exp_sim_over_t():
    query = torch.tensor([[1.0, 0.0]])  # similarities 1, 0, 0.6
    k2 = knn_predict(query, BANK, BANK_LABELS, num_classes=3, k=2, t=0.1)
    assert torch.allclose(k2, torch.tensor([[math.exp(10), math.exp(6), 0.0]]))
    k3 = knn_predict(query, BANK, BANK_LABELS, num_classes=3, k=3, t=0.5)
    assert torch.allclose(k3, torch.tensor([[math.exp(2), math.exp(0) + math.exp(1.2), 0.0]]))


def test_knn_clips_k_and_chunks_queries():
    query = torch.nn.functional.normalize(torch.randn(7, 2), dim=1)
    full = knn_predict(query, BANK, BANK_LABELS, 2, k=3)
    assert torch.equal(knn_predict(query, BANK, BANK_LABELS, 2, k=200, chunk_size=2), full)


def test_topk_accuracy_percent():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    assert topk_accuracy(scores, torch.tensor([1, 2, 1]), ks=(1, 2, 5)) == pytest.approx([100 / 3, 200 / 3, 100.0])


def _loader(root, size=16, batch_size=8):
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.25] * 3)])
    data = ImageFolder(root, tf, on_error="skip")
    return DataLoader(data, batch_size=batch_size, collate_fn=collate_images)


def test_compute_embeddings_normalised_ordered_and_lists_failures(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=3)
    (root / "class1" / "broken.png").write_bytes(b"not a png")
    model = tiny_resnet().train()
    emb = compute_embeddings(model, _loader(root, batch_size=4))
    assert model.training  # mode restored
    assert emb.features.shape == (9, 512) and emb.features.dtype == torch.float32
    assert torch.allclose(emb.features.norm(dim=1), torch.ones(9))
    assert emb.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(emb.failed) == 1 and emb.failed[0].endswith("broken.png")
    assert 3 not in emb.indices.tolist()  # broken.png sorts first in class1: index 3
    fast = compute_embeddings(model, _loader(root, batch_size=4), precision="bf16", channels_last=True)
    assert (fast.features * emb.features).sum(1).min() > 0.98


def test_knn_evaluate_separable_dataset(tmp_path):
    train = make_image_folder(tmp_path / "train", per_class=8, seed=1)
    val = make_image_folder(tmp_path / "val", per_class=4, seed=2)
    metrics = knn_evaluate(tiny_resnet(), _loader(train), _loader(val), k=200, t=0.1)
    assert metrics["top1"] == 100.0 and metrics["top5"] == 100.0
    assert metrics["k"] == 24 and metrics["num_val"] == 12 and metrics["failed"] == []


def test_knn_rejects_unlabelled_and_mismatched_folders(tmp_path):
    train = make_image_folder(tmp_path / "train", per_class=2)
    flat = make_image_folder(tmp_path / "flat", per_class=2, labelled=False)
    other = make_image_folder(tmp_path / "other", num_classes=2, per_class=2)
    model = tiny_resnet()
    with pytest.raises(MocohubError, match="no labels"):
        knn_evaluate(model, _loader(flat), _loader(train))
    with pytest.raises(MocohubError, match="different classes"):
        knn_evaluate(model, _loader(train), _loader(other))
