"""transform_for normalises as the model was trained: ImageNet's mean/std for a zoo v1/v2 model,
the official CIFAR demo's for a CIFAR run's export, checked on the pixels, not through an accuracy."""
import dataclasses

import pytest
import torch
from PIL import Image

import mocohub
from mocohub.data.synthetic import make_dataset
from mocohub.training import TrainConfig, train
from mocohub.zoo.registry import REGISTRY
from zoo_layouts import moco_v1v2

IMAGENET = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # MoCo v1/v2 main_moco.py's Normalize
CIFAR = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # the official CIFAR-10 demo's
COLOUR = (200, 100, 30)


def _pixels(model: torch.nn.Module, size: int) -> torch.Tensor:
    """The preprocessed channel values of a plain-coloured image (the same at every pixel)."""
    image = mocohub.transform_for(model)(Image.new("RGB", (size, size), COLOUR))
    assert image.shape == (3, size, size)
    return image.flatten(1).mean(1)


def _expected(mean_std) -> torch.Tensor:
    mean, std = mean_std
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(COLOUR, mean, std)])


def test_a_zoo_v2_model_normalises_with_imagenets_mean_and_std(tmp_path, monkeypatch):
    name = "moco-v2-r50-800ep"
    site = tmp_path / "zoo"
    target = site / REGISTRY[name].path
    target.parent.mkdir(parents=True)
    torch.save(moco_v1v2("resnet18", cleaned=True), target)  # the official layout, a small ResNet
    monkeypatch.setitem(REGISTRY, name, dataclasses.replace(REGISTRY[name], hash=None))
    monkeypatch.setenv("MOCOHUB_ZOO_URL", site.as_uri())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    model = mocohub.from_pretrained("moco-r50", progress=False)
    assert torch.allclose(_pixels(model, 224), _expected(IMAGENET), atol=1e-5)


def test_a_cifar_runs_export_normalises_with_the_cifar_demos_mean_and_std(tmp_path):
    data, _ = make_dataset(tmp_path / "data", train_per_class=2, val_per_class=0, size=16)
    backbone = train(TrainConfig.from_recipe(
        "cifar", data=str(data), out=str(tmp_path / "run"), epochs=1, arch="test_resnet", image_size=16,
        batch_size=8, moco_k=16, workers=0, progress=False, precision="fp32"))
    for source in (backbone, backbone.parent):  # the export, and the run folder that holds it
        assert torch.allclose(_pixels(mocohub.from_pretrained(source), 16), _expected(CIFAR), atol=1e-5)
