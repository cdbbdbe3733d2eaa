"""Training checkpoints: the official layouts (v1/v2, v3) plus what an exact resume needs, written atomically."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from ..errors import MocohubError
from ..fileio import atomic_write
from ..zoo.formats import pretraining_format, read_checkpoint
from ..run_folder import CHECKPOINT
from .recipes import recipe_flags

__all__ = ["CHECKPOINT_NAME", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]

CHECKPOINT_NAME = CHECKPOINT


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write to a temp file, fsync, rename: a kill at any moment leaves the previous file intact."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


# generation -> (layout name, its encoder keys, the recipes that train it)
_GENERATIONS = {
    "v1/v2": ("moco-v1/v2", "module.encoder_q.*", recipe_flags(v3=False)),
    "v3": ("moco-v3", "module.base_encoder.*", recipe_flags(v3=True)),
}


def load_checkpoint(path: str | os.PathLike, generation: str | None = None) -> dict[str, Any]:
    """Load a mocohub or official MoCo pre-training checkpoint, unpickling nothing arbitrary.

    ``generation`` ("v1/v2" or "v3"): refuse the other generation's checkpoint, naming the recipes
    that resume it (a v2 file cannot continue a v3 run: different models, no queue).
    """
    path = Path(path)
    if not path.is_file():
        raise MocohubError(f"checkpoint {path} does not exist")
    state = read_checkpoint(path)
    found = pretraining_format(state) if isinstance(state, dict) and isinstance(state.get("state_dict"), dict) \
        else None
    wanted = [generation] if generation else list(_GENERATIONS)
    if found is None:
        keys = " or ".join(f"'{_GENERATIONS[g][1]}'" for g in wanted)
        raise MocohubError(f"{path} is not a MoCo {' or '.join(wanted)} training checkpoint: expected a 'state_dict' "
                           f"with {keys} keys (a mocohub run's checkpoint.pth.tar or an official pre-training file)")
    saved = next(g for g, (name, _, _) in _GENERATIONS.items() if name == found)
    if saved not in wanted:
        raise MocohubError(f"{path} is a MoCo {saved} checkpoint ('{_GENERATIONS[saved][1]}' keys) and this is a "
                           f"MoCo {generation} run: resume it with {_GENERATIONS[saved][2]}, or train this run "
                           "without --resume (into a fresh --out)")
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
