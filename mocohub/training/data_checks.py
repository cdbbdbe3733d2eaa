"""The settings checked against the data, at start: the queue against the number of images, the
batch against the epoch, the lr against the batch (the linear scaling rule), the kNN monitor's
classes. Pure functions of the settings and the counts, so every rule has a table test.

The queue's bound. The queue holds the keys of the last K images; a query's own image (another
view of it, from the key encoder of a few steps ago) is among them when the image came round
again within K images. Over two shuffled epochs that happens to about (K/N)^2/2 of the queries
(N images, K <= N): 0.13 % at the paper's K 65,536 on 1.28 M images (5 %), 0.32 % at the official
CIFAR-10 demo's K 4,096 on 50,000 (8 %), 2 % at 20 %, a third at 82 %, every query once K >= 2N
(a simulation of the queue batch by batch gives a little more: 2.6 % for 2.1 % at K 1,024 of
5,000 images, 37 % for 34 % at 4,096). Such a key is a positive scored as a negative. Measured
(benchmarks/ablations-cpu/queue.md, 10 epochs, 2 seeds; ``QUEUE_EVIDENCE``): kNN top-1 falls as the
queue grows from 5 % to 82 % of the images. The bound, 10 %, lies just above both published settings
and at half the smallest fraction measured lower.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .recipes import Recipe, get_recipe

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["MIN_STEPS", "QUEUE_FRACTION", "QUEUE_EVIDENCE", "DataCheck", "check_data", "knn_classes_refusal", "linear_scaling_lr",
           "own_image_share", "sensible_queue"]

QUEUE_FRACTION = 0.10  # the largest queue, as a share of the training images, that the evidence supports
QUEUE_EVIDENCE = "5,000 images: 38.1 at K 5 %, 36.4 at 20 %, 34.8 at 82 %"  # the queue ablation, kNN top-1
MIN_STEPS = 5          # "a handful": below it a fifth or more of each epoch is one step


@dataclass(frozen=True)
class DataCheck:
    """What the start says about the settings: a refusal (the run must not start), warnings, and the
    note of an lr the linear scaling rule chose."""

    refusal: str | None = None
    warnings: tuple[str, ...] = ()
    lr_note: str | None = None

    @property
    def lines(self) -> list[str]:
        """What the start lines add (the lr note)."""
        return [self.lr_note] if self.lr_note else []


def linear_scaling_lr(recipe: Recipe, batch_size: int) -> float:
    """v1/v2: the recipe's lr for its batch, scaled to ``batch_size`` (Goyal et al., 2017)."""
    return recipe.lr * batch_size / recipe.batch_size


def own_image_share(queue: int, images: int) -> float:
    """The share of queries whose own image is in the queue: the gap between an image's places in
    two shuffled epochs is the sum of two uniform draws over [0, N), at most K with this chance."""
    x = queue / images
    return x * x / 2 if x <= 1 else 1 - (2 - x) ** 2 / 2 if x < 2 else 1.0


def sensible_queue(images: int, enqueued: int) -> int:
    """The largest K within ``QUEUE_FRACTION`` of the images that is a multiple of the keys one step
    enqueues (the global batch, twice it with --symmetric); one step's keys at the least."""
    return max(enqueued, int(images * QUEUE_FRACTION) // enqueued * enqueued)


def _queue(cfg: TrainConfig, images: int) -> tuple[str | None, list[str]]:
    k, enqueued = cfg.moco_k, cfg.batch_size * (2 if cfg.symmetric else 1)
    best = sensible_queue(images, enqueued)
    if k <= images * QUEUE_FRACTION:
        return None, []
    fix = (f"--moco-k {best} keeps it within {QUEUE_FRACTION:.0%}" if best < k else
           f"the queue cannot be shorter than one step's {enqueued} keys: a smaller --batch-size allows a shorter one")
    what = (f"--moco-k {k} is {k / images:.0%} of the {images:,} training images: about "
            f"{own_image_share(k, images):.0%} of the queries meet their own image among the negatives")
    if k > images and not cfg.allow_large_queue:
        return (f"{what} (more keys than images); {fix}, or pass --allow-large-queue to train with it "
                "anyway"), []
    return None, [f"{what}, which lowered kNN top-1 in the queue ablation ({QUEUE_EVIDENCE}); {fix}"]


def _lr_note(cfg: TrainConfig) -> str | None:
    """Said where the lr is the one ``TrainConfig.from_recipe`` gives by the rule (exactly: an --lr
    given at the rule's value reads the same, and is the same)."""
    recipe = get_recipe(cfg.recipe)
    if cfg.moco_version == "v3" or cfg.batch_size == recipe.batch_size or \
            cfg.lr != linear_scaling_lr(recipe, cfg.batch_size):
        return None
    return (f"lr {cfg.lr:.4g} ({recipe.lr:g} x {cfg.batch_size}/{recipe.batch_size}, the linear scaling rule; "
            "--lr to set it)")


def check_data(cfg: TrainConfig, images: int) -> DataCheck:
    """The rules, for ``images`` training images (the global batch is ``cfg.batch_size``)."""
    if images < cfg.batch_size:
        return DataCheck(f"{cfg.data} has {images} images, fewer than one batch of {cfg.batch_size}: lower "
                         "--batch-size (v1/v2: and --moco-k to a multiple of it)")
    refusal, warned = _queue(cfg, images) if cfg.moco_version != "v3" else (None, [])
    if refusal:
        return DataCheck(refusal)
    steps = images // cfg.batch_size
    if steps < MIN_STEPS:
        warned.append(f"{images:,} images make {steps} step(s) of {cfg.batch_size} per epoch, and the last "
                      f"{images - steps * cfg.batch_size} wait for a later epoch (the partial batch is dropped): "
                      f"a --batch-size of at most {images // MIN_STEPS} gives {MIN_STEPS} steps or more")
    return DataCheck(None, tuple(warned), _lr_note(cfg))


def knn_classes_refusal(val: str, bank_classes: Sequence[str], val_classes: Sequence[str], data: str) -> str | None:
    """The kNN monitor needs the same two or more classes in the training and --val folders."""
    if not val_classes:
        return (f"--val {val} has no class sub-folders: the kNN monitor needs DIR/<class>/<image> with the "
                "training folder's classes")
    if not bank_classes:
        return (f"--val needs labelled training images for the kNN bank: put {data}'s images in class "
                "sub-folders, or drop --val")
    if list(bank_classes) != list(val_classes):
        return (f"--val {val} has classes {list(val_classes)[:5]}..., the training folder "
                f"{list(bank_classes)[:5]}...: the kNN monitor needs the same class sub-folders")
    if len(val_classes) < 2:
        return (f"--val {val} has one class ({val_classes[0]}): a kNN over one class scores 100 % whatever the "
                "features; give two classes or more, or drop --val")
    return None
