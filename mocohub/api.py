"""``mocohub.train(...)``: the ``mocohub train`` command as a Python function that returns the run.

The settings go through ``TrainConfig.from_recipe`` as the command's flags do, and the run through
the same trainer: the same checks on the data, the same messages (a ``MocohubError`` here, one
line there), the same resume of an unfinished ``out`` folder, the same tqdm.auto progress bar
(a widget in a notebook).
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import MocohubError
from .jsonlog import read_jsonl
from .run_folder import RunFolder
from .training.config import TrainConfig

__all__ = ["Run", "train", "train_config"]


@dataclass(frozen=True)
class Run:
    """A finished (or stopped at ``max_steps``) run: its folder, epoch rows and exported backbone."""

    folder: Path
    backbone: Path

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """One row per epoch, as ``metrics.jsonl`` holds them (loss, lr, images/s, kNN top-1, ...)."""
        return read_jsonl(RunFolder(self.folder).metrics)

    def load(self, **kwargs: Any):
        """The trained backbone, as ``mocohub.from_pretrained(run.backbone, **kwargs)`` loads it."""
        from .zoo.loading import from_pretrained

        return from_pretrained(str(self.backbone), **kwargs)


def train_config(data: str | os.PathLike, recipe: str = "cifar", out: str | os.PathLike | None = None,
                 **overrides: Any) -> TrainConfig:
    """The run's settings as the command builds them; a name that is no setting is refused with the valid ones."""
    names = [f.name for f in fields(TrainConfig) if f.name not in ("data", "out", "recipe")]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise MocohubError(f"unknown setting {unknown[0]!r}{hint}; valid: {', '.join(sorted(names))}")
    return TrainConfig.from_recipe(recipe, data=str(data), out=None if out is None else str(out), **overrides)


def train(data: str | os.PathLike, recipe: str = "cifar", out: str | os.PathLike | None = None,
          **overrides: Any) -> Run:
    """Pre-train on the images under ``data`` with ``recipe``, each keyword overriding one of its settings
    (the command's flags with underscores: ``batch_size=64``, ``epochs=5``); ``out`` an unfinished run's
    folder resumes it. Returns the run; ``run.load()`` is the trained backbone."""
    from .training.trainer import train as run_trainer  # torch: imported when a run starts

    backbone = Path(run_trainer(train_config(data, recipe, out, **overrides)))
    return Run(folder=backbone.parent, backbone=backbone)
