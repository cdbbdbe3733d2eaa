"""Training checkpoints: the official layout plus what an exact resume needs, written atomically."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from ..errors import MocohubError
from ..fileio import atomic_write
from ..zoo.formats import detect_format, read_checkpoint
from ..zoo.pretrained import RUN_CHECKPOINT

__all__ = ["CHECKPOINT_NAME", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]

CHECKPOINT_NAME = RUN_CHECKPOINT


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write to a temp file, fsync, rename: a kill at any moment leaves the previous file intact."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a mocohub or official MoCo v1/v2 pre-training checkpoint, unpickling nothing arbitrary."""
    path = Path(path)
    if not path.is_file():
        raise MocohubError(f"checkpoint {path} does not exist")
    state = read_checkpoint(path)
    if not isinstance(state, dict) or detect_format(state) not in ("moco-v1/v2", "mocohub-checkpoint") \
            or not isinstance(state.get("state_dict"), dict):
        raise MocohubError(f"{path} is not a MoCo v1/v2 training checkpoint: expected a 'state_dict' with "
                           "'module.encoder_q.*' keys (a mocohub run's checkpoint.pth.tar or an official "
                           "*_pretrain.pth.tar)")
    return state


def rng_state() -> dict[str, Any]:
    """The generators a step draws from: CPU, Python, and this process's own GPU only (a resume
    may see fewer GPUs, or another index, than the run that saved it)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available():  # older files held a list per GPU
        torch.cuda.set_rng_state(cuda)
