"""Everything a training run is told: a recipe's values, overridden flag by flag."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..errors import MocohubError
from .data_checks import linear_scaling_lr
from .recipes import Recipe, get_recipe

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig(Recipe):
    """A Recipe plus the run's own settings (data, output, hardware, monitoring)."""

    data: str = ""
    out: str = ""                     # empty: a fresh folder runs/<recipe>-<arch>-<time>
    recipe: str = "moco-v2"
    bn_splits: int | None = None      # per rank; None: bn_groups // world_size
    allow_large_queue: bool = False   # v1/v2: train with more queue keys than images (data_checks.py)
    micro_batch: int | None = None    # images per forward/backward chunk of each process's batch
    lr_per_iteration: bool = False
    precision: str = "auto"           # bf16 where the hardware has it natively, else fp32
    channels_last: bool | None = None  # None: NHWC with bf16/fp16
    workers: int | None = None        # None: auto, see Trainer._choose_workers
    aug_impl: str = "auto"            # batched (tensor ops on aug_device) | pil (per image in the workers)
    aug_device: str = "auto"          # where the batched photometric ops run: the training device by default
    cache_images: str = "auto"        # decode once and keep in memory when the decoded set fits
    compile: bool = False             # torch.compile the encoders
    seed: int = 0
    val: str | None = None
    knn_every: int = 1
    knn_k: int = 200
    knn_t: float = 0.1
    resume: str | None = None         # a checkpoint; RUN_DIR/checkpoint.pth.tar is resumed by itself
    restart: bool = False             # set an existing run folder's files aside and start over
    max_steps: int | None = None      # stop (and checkpoint) after this many steps in total
    time_budget: float | None = None  # seconds for the whole run: the trainer plans the epochs (budget.py)
    log_every: int = 10
    tensorboard: bool = False         # mirror the logged scalars to RUN_DIR/tensorboard
    device: str | None = None
    progress: bool = True

    @classmethod
    def from_recipe(cls, recipe: str = "moco-v2", **overrides: Any) -> "TrainConfig":
        """The recipe's values, then every override that is not None; v1/v2 without an ``lr``: the
        recipe's, scaled linearly to the batch (``data_checks.linear_scaling_lr``). ``time_budget``
        plans the epochs, so an ``epochs`` beside it is refused (here: the only place that sees both given)."""
        if overrides.get("time_budget") is not None and overrides.get("epochs") is not None:
            raise MocohubError("--epochs and --time-budget both set the run's length: give one of them")
        base = get_recipe(recipe).as_dict()
        base.update({k: v for k, v in overrides.items() if v is not None})
        if overrides.get("lr") is None and base["moco_version"] != "v3":  # v3 scales by batch/256 itself
            base["lr"] = linear_scaling_lr(get_recipe(recipe), base["batch_size"])
        base["recipe"] = recipe
        base["lr_steps"] = tuple(base["lr_steps"])
        return cls(**{f.name: base[f.name] for f in fields(cls) if f.name in base})
