"""The recipes are the papers' settings (REFERENCE.md §1 and §4), value by value, and their
learning-rate schedules give the official lr at chosen steps."""
import math

import pytest
import torch
from torchvision import transforms as T

from mocohub.data.augment import GaussianBlur, augmentation
from mocohub.training import RECIPES, TrainConfig
from mocohub.training.schedule import lr_schedule

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))  # the official CIFAR-10 demo's

V1 = dict(arch="resnet50", stem="imagenet", epochs=200, batch_size=256, lr=0.03, schedule="step",
          lr_steps=(120, 160), momentum=0.9, weight_decay=1e-4, moco_dim=128, moco_k=65536, moco_m=0.999,
          moco_t=0.07, mlp=False, aug="moco-v1", image_size=224, bn_groups=8, shuffle_bn=True)
EXPECTED = {
    "moco-v1": V1,
    "moco-v2": {**V1, "schedule": "cos", "moco_t": 0.2, "mlp": True, "aug": "moco-v2"},
    "cifar": {**V1, "arch": "resnet18", "stem": "cifar", "batch_size": 512, "lr": 0.06, "schedule": "cos",
              "weight_decay": 5e-4, "moco_k": 4096, "moco_m": 0.99, "moco_t": 0.1, "aug": "cifar",
              "image_size": 32},
    # mocohub's CPU recipe (issue 23): the demo's values but the network, batch, lr per image kept, MLP head, T 0.2
    "cifar-cpu": {**V1, "arch": "resnet10t_half", "stem": "cifar", "batch_size": 256, "lr": 0.03, "schedule": "cos",
                  "weight_decay": 5e-4, "moco_k": 4096, "moco_m": 0.99, "moco_t": 0.2, "mlp": True, "aug": "cifar",
                  "image_size": 32},
    # MoCo v3 (REFERENCE §1): the released ResNet-50, 100 epochs (--moco-m-cos --crop-min=.2); lr is the base
    # lr for 256 images; no queue (K 0); the v3-only fields of v1/v2 keep their defaults (below)
    "moco-v3": {"arch": "resnet50", "stem": "imagenet", "epochs": 100, "batch_size": 4096, "lr": 0.6,
                "optimizer": "lars", "momentum": 0.9, "weight_decay": 1e-6, "warmup_epochs": 10, "schedule": "cos",
                "moco_m": 0.99, "moco_m_cos": True, "moco_t": 1.0, "moco_dim": 256, "mlp_dim": 4096, "moco_k": 0,
                "crop_min": 0.2, "aug": "moco-v3", "image_size": 224, "moco_version": "v3", "symmetric": True,
                "stop_grad_conv1": False, "shuffle_bn": True},  # no Shuffle BN in v3: the field stays at its default
    "moco-v3-vit": {"arch": "vit_small", "epochs": 300, "batch_size": 4096, "lr": 1.5e-4, "optimizer": "adamw",
                    "weight_decay": 0.1, "warmup_epochs": 40, "moco_m": 0.99, "moco_m_cos": True, "moco_t": 0.2,
                    "moco_dim": 256, "mlp_dim": 4096, "crop_min": 0.08, "stop_grad_conv1": True, "aug": "moco-v3",
                    "image_size": 224, "moco_version": "v3", "shuffle_bn": True},
    # no official one: the ResNet-50 recipe's MoCo v3 values, the CIFAR demo's data-size values
    "cifar-v3": {"arch": "resnet18", "stem": "cifar", "epochs": 200, "batch_size": 512, "lr": 0.6,
                 "optimizer": "lars", "weight_decay": 1e-6, "warmup_epochs": 10, "moco_m": 0.99, "moco_m_cos": True,
                 "moco_t": 1.0, "moco_dim": 256, "mlp_dim": 4096, "crop_min": 0.2, "aug": "moco-v3",
                 "image_size": 32, "moco_version": "v3", "shuffle_bn": True},
}
V3_ONLY = dict(optimizer="sgd", warmup_epochs=0, moco_m_cos=False, stop_grad_conv1=False, patch_size=None,
               symmetric=False)
for _name in ("moco-v1", "moco-v2", "cifar", "cifar-cpu"):
    EXPECTED[_name] = {**EXPECTED[_name], **V3_ONLY}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_values_are_the_papers(name):
    recipe = RECIPES[name]
    assert {field: getattr(recipe, field) for field in EXPECTED[name]} == EXPECTED[name]
    cfg = TrainConfig.from_recipe(name)  # what `mocohub train --recipe NAME` starts from
    assert {field: getattr(cfg, field) for field in EXPECTED[name]} == EXPECTED[name]


def _describe(t) -> tuple:
    """A transform as (kind, parameters), rounded: comparable with the papers' text."""
    r = lambda v: tuple(round(float(x), 6) for x in v)  # noqa: E731
    if isinstance(t, T.RandomResizedCrop):
        return "RandomResizedCrop", tuple(t.size), r(t.scale), r(t.ratio)
    if isinstance(t, T.ColorJitter):
        return "ColorJitter", r(t.brightness), r(t.contrast), r(t.saturation), r(t.hue)
    if isinstance(t, T.RandomApply):
        return "RandomApply", t.p, tuple(_describe(inner) for inner in t.transforms)
    if isinstance(t, (T.RandomGrayscale, T.RandomHorizontalFlip)):
        return type(t).__name__, t.p
    if isinstance(t, GaussianBlur):
        return "GaussianBlur", r(t.sigma)
    if isinstance(t, T.Normalize):
        return "Normalize", r(t.mean), r(t.std)
    return (type(t).__name__,)


def _jitter(b, c, s, h):
    return "ColorJitter", (1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s), (-h, h)


RATIO = (0.75, 4 / 3)
AUG = {
    "moco-v1": [("RandomResizedCrop", (224, 224), (0.2, 1.0), RATIO), ("RandomGrayscale", 0.2),
                _jitter(0.4, 0.4, 0.4, 0.4), ("RandomHorizontalFlip", 0.5), ("ToTensor",), ("Normalize", *IMAGENET)],
    "moco-v2": [("RandomResizedCrop", (224, 224), (0.2, 1.0), RATIO),
                ("RandomApply", 0.8, (_jitter(0.4, 0.4, 0.4, 0.1),)), ("RandomGrayscale", 0.2),
                ("RandomApply", 0.5, (("GaussianBlur", (0.1, 2.0)),)), ("RandomHorizontalFlip", 0.5),
                ("ToTensor",), ("Normalize", *IMAGENET)],
    "cifar": [("RandomResizedCrop", (32, 32), (0.08, 1.0), RATIO), ("RandomHorizontalFlip", 0.5),  # RRC(32)'s
              ("RandomApply", 0.8, (_jitter(0.4, 0.4, 0.4, 0.1),)), ("RandomGrayscale", 0.2),  # default scale
              ("ToTensor",), ("Normalize", *CIFAR)],
}
AUG["cifar-cpu"] = AUG["cifar"]  # the demo's augmentation


@pytest.mark.parametrize("name", sorted(AUG))
def test_recipe_augmentation_is_the_papers(name):
    recipe = RECIPES[name]
    pipeline = augmentation(recipe.aug, recipe.image_size).transforms
    assert [_describe(t) for t in pipeline] == [_describe_expected(step) for step in AUG[name]]


def _describe_expected(step):
    """Round the hand-written floats the way _describe rounds the real ones."""
    def fix(v):
        if isinstance(v, tuple):
            return tuple(fix(x) for x in v)
        return round(v, 6) if isinstance(v, float) else v
    return fix(step)


def test_released_v3_resnet_variants_are_reachable_by_flags():
    """300 epochs: lr .3; 1000 epochs: lr .3, wd 1.5e-6, m .996 (REFERENCE §1, the zoo's recipes)."""
    from mocohub.zoo.registry import get_model
    v300 = TrainConfig.from_recipe("moco-v3", epochs=300, lr=0.3)
    v1000 = TrainConfig.from_recipe("moco-v3", epochs=1000, lr=0.3, weight_decay=1.5e-6, moco_m=0.996)
    for cfg, name in ((TrainConfig.from_recipe("moco-v3"), "moco-v3-r50-100ep"), (v300, "moco-v3-r50-300ep"),
                      (v1000, "moco-v3-r50-1000ep")):
        recipe = get_model(name).recipe
        g = lambda v: f"{v:g}".replace("e-0", "e-")  # noqa: E731  (the zoo writes 1e-6)
        assert f"lr {g(cfg.lr)} wd {g(cfg.weight_decay)}" in recipe and f"m-cos {g(cfg.moco_m)}" in recipe
        assert f"batch {cfg.batch_size}" in recipe and f"crop-min {g(cfg.crop_min)}" in recipe


def test_v3_warmup_cosine_schedule_per_iteration():
    """main_moco.py: lr = base x batch/256 x (epoch/warmup, then half-cosine), epoch = e + i/iters."""
    from mocohub.training.algorithms import build_algorithm
    cfg = TrainConfig.from_recipe("moco-v3", batch_size=512, mlp_dim=16)  # peak 0.6 x 2 = 1.2
    algo = build_algorithm(cfg, steps_per_epoch=10, bn_splits=1, device=torch.device("cpu"), sync_bn=False)
    lrs = [algo.schedule(step)["lr"] for step in range(1001)]
    assert algo.optimizer.param_groups[0]["lr"] == lrs[-1]  # set on the optimiser, as adjust_learning_rate
    cos = lambda epoch: 1.2 * 0.5 * (1 + math.cos(math.pi * (epoch - 10) / 90))  # noqa: E731
    assert [lrs[s] for s in (0, 5, 50, 99, 100, 101, 550, 1000)] == pytest.approx(
        [0.0, 0.06, 0.6, 1.2 * 9.9 / 10, 1.2, cos(10.1), 0.6, 0.0], abs=1e-12)
    assert algo.schedule(0)["moco_m"] == 0.99 and algo.schedule(500)["moco_m"] == pytest.approx(0.995)
    assert algo.schedule(1000)["moco_m"] == pytest.approx(1.0)


def _lrs(name: str, steps: list[int], *, per_iteration: bool, steps_per_epoch: int = 10) -> list[float]:
    """The lr of each of ``steps`` under the recipe's schedule."""
    recipe = RECIPES[name]
    factor = lr_schedule(epochs=recipe.epochs, steps_per_epoch=steps_per_epoch, schedule=recipe.schedule,
                         milestones=recipe.lr_steps, per_iteration=per_iteration)
    return [recipe.lr * factor(step) for step in steps]


STEPS = [0, 5, 15, 1195, 1200, 1599, 1600, 1999]  # 10 steps per epoch: epochs 0, 0.5, 1.5, 119.5, 120, ...


def test_step_schedule_drops_tenfold_at_120_and_160():
    expected = [0.03] * 4 + [0.003] * 2 + [0.0003] * 2
    assert _lrs("moco-v1", STEPS, per_iteration=False) == pytest.approx(expected, rel=1e-9)
    assert _lrs("moco-v1", STEPS, per_iteration=True) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("name, base", [("moco-v2", 0.03), ("cifar", 0.06)])
def test_cosine_schedule_per_epoch_and_per_iteration(name, base):
    cos = lambda epoch: base * 0.5 * (1 + math.cos(math.pi * epoch / 200))  # noqa: E731
    per_epoch = [cos(s // 10) for s in STEPS]  # the official adjust_learning_rate: constant within an epoch
    per_iteration = [cos(s / 10) for s in STEPS]
    assert _lrs(name, STEPS, per_iteration=False) == pytest.approx(per_epoch, rel=1e-9)
    assert _lrs(name, STEPS, per_iteration=True) == pytest.approx(per_iteration, rel=1e-9)
    assert _lrs(name, [1000, 1999], per_iteration=False) == pytest.approx([base / 2, cos(199)])  # epoch 100 of 200
