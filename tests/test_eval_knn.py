"""Weighted kNN and embeddings: hand-computed votes and a separable generated dataset."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader
from torchvision import transforms

from eval_fixtures import make_image_folder, tiny_resnet
from mocohub.data.folder import ImageFolder, collate_images
from mocohub.errors import MocohubError
from mocohub.evaluation import compute_embeddings, knn_evaluate, knn_predict, topk_accuracy
from mocohub.evaluation import knn as knn_module
from mocohub.evaluation.embeddings import scoring_device, scratch_bytes
from mocohub.evaluation.knn import knn_chunk_rows

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


class _MatmulSizes(TorchDispatchMode):
    """The element count of every matrix product's output while it is active."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("mm", "matmul", "addmm"):
            self.sizes.append(out.numel())
        return out


@pytest.mark.parametrize("bank_rows, k, budget, expected", [
    (1_281_167, 200, 256 << 20, 52),    # ImageNet's bank, the CPU's 256 MiB: 52 rows (was 1024: 5.2 GB)
    (1_281_167, 200, 1 << 30, 209),     # a GPU's 1 GiB
    (50_000, 200, 256 << 20, 1315),     # CIFAR-10
    (10, 10, 100, 1),                   # never zero rows
])
def test_knn_chunk_rows_fit_the_memory_bound(bank_rows, k, budget, expected):
    rows = knn_chunk_rows(bank_rows, k, budget)
    assert rows == expected
    per_row = bank_rows * 4 + k * 20
    assert rows == 1 or rows * per_row <= budget < (rows + 1) * per_row


def test_knn_default_chunks_respect_the_device_budget_and_equal_one_chunk(monkeypatch):
    torch.manual_seed(0)
    query = F.normalize(torch.randn(300, 64), dim=1)
    bank = F.normalize(torch.randn(1000, 64), dim=1)
    labels = torch.randint(0, 10, (1000,))
    whole = knn_predict(query, bank, labels, 10, k=50, chunk_size=300)
    budget = 40 * (1000 * 4 + 50 * 20) + 7  # 40 rows
    monkeypatch.setattr(knn_module, "scratch_bytes", lambda device: budget, raising=False)
    spy = _MatmulSizes()
    with spy:
        chunked = knn_predict(query, bank, labels, 10, k=50)
    assert torch.equal(chunked, whole)
    assert spy.sizes and max(spy.sizes) == 40 * 1000 and len(spy.sizes) == 8  # ceil(300 / 40) chunks


def _fake_gpu(monkeypatch, free):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 << 30))


@pytest.mark.parametrize("requested, need, free, expected", [
    (None, 1 << 30, 16 << 30, "cuda:0"),   # the visible GPU by default
    (None, 10 << 30, 16 << 30, "cpu"),     # no room for the data and its chunks: the CPU, not an OOM
    ("cuda:0", 0, 1 << 30, "cuda:0"),
    ("cpu", 0, 16 << 30, "cpu"),           # --device cpu stays there
])
def test_scoring_device(monkeypatch, requested, need, free, expected):
    _fake_gpu(monkeypatch, free)
    assert scoring_device(requested, need) == torch.device(expected)


@pytest.mark.parametrize("device, free, expected", [
    ("cpu", 0, 256 << 20), ("cuda:0", 16 << 30, 1 << 30), ("cuda:0", 2 << 30, 512 << 20),
])
def test_scratch_bytes(monkeypatch, device, free, expected):
    _fake_gpu(monkeypatch, free)
    assert scratch_bytes(device) == expected
