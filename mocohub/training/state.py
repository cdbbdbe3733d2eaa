"""A run's position and what its checkpoint holds: captured in the official layout of the run's
generation plus a ``mocohub`` entry (config, data fingerprint, RNG, step in epoch, epoch sums),
and restored from a mocohub or an official checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..algorithm import MoCo, MoCoV3
from ..errors import MocohubError
from .algorithms import Algorithm, fit_optimizer_state
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .meter import EpochSums
from .resume import config_differences

__all__ = ["TrainState", "saved_plan"]


def saved_plan(path: Path) -> dict[str, Any] | None:
    """The ``--time-budget`` plan a mocohub checkpoint keeps (None: no file, no plan, or not a
    checkpoint, which ``TrainState.restore`` reports), read before the model is built: a resumed
    run keeps its epochs."""
    try:
        return (load_checkpoint(path).get("mocohub") or {}).get("plan") if path.is_file() else None
    except MocohubError:
        return None


def _official_state_dict(model: MoCo | MoCoV3) -> dict[str, torch.Tensor]:
    """The official names, as DDP saves them (``module.`` prefix)."""
    return {f"module.{k}": v for k, v in model.state_dict().items()}


class TrainState:
    """Where the run is (epoch, step within it) and the objects a checkpoint captures."""

    def __init__(self, cfg: TrainConfig, algo: Algorithm, scaler: torch.amp.GradScaler, *, world: int,
                 data_id: dict[str, Any], steps_per_epoch: int, plan: dict[str, Any] | None = None):
        self.cfg, self.algo, self.scaler, self.world, self.data_id = cfg, algo, scaler, world, data_id
        self.plan = plan  # a --time-budget run's plan (budget.make_plan), kept by its checkpoints
        self.steps_per_epoch = steps_per_epoch
        self.epoch = self.step_in_epoch = 0

    @property
    def global_step(self) -> int:
        """Optimisation steps done so far, over all epochs."""
        return self.epoch * self.steps_per_epoch + self.step_in_epoch

    def capture(self, sums: EpochSums) -> dict[str, Any]:
        """The official layout of the run's generation (v3 adds ``scaler``), plus mocohub's extras."""
        model = self.algo.model
        return {
            "epoch": self.epoch, "arch": self.cfg.arch, "state_dict": _official_state_dict(model),
            "optimizer": self.algo.optimizer.state_dict(), **model.checkpoint_extras(self.scaler),
            "mocohub": {"config": self.cfg.as_dict(), "data": self.data_id, "scaler": self.scaler.state_dict(),
                        "rng": rng_state(), "step_in_epoch": self.step_in_epoch, "world_size": self.world,
                        "epoch_sums": sums.as_dict(), "plan": self.plan},
        }

    def save(self, path: Path, sums: EpochSums) -> None:
        save_checkpoint(self.capture(sums), path)

    def _check_resume(self, path: Path, extra: dict[str, Any], main: bool) -> None:
        """Refuse a resume that would continue a different experiment; report allowed changes."""
        saved = {**extra.get("config", {}), "world_size": extra.get("world_size")}
        current = {**self.cfg.as_dict(), "world_size": self.world}
        if "data" in extra:
            saved["data_images"], current["data_images"] = extra["data"], self.data_id
        refused, changed = config_differences(saved, current)
        if refused:
            raise MocohubError(f"{path} was trained with other settings, so resuming it would continue a different "
                               "experiment:\n  " + "\n  ".join(refused) + "\nRun with the old settings, train into "
                               "another --out (or leave --out unset for a fresh folder), or pass --restart to start "
                               "this folder over (its files are kept aside)")
        if changed and main:
            tqdm.write("resuming with changed settings: " + "; ".join(changed))

    def _load_weights(self, path: Path, state: dict[str, Any]) -> None:
        model, optimizer = self.algo.model, self.algo.optimizer
        try:
            model.load_state_dict({k.removeprefix("module."): v for k, v in state["state_dict"].items()}, strict=True)
        except RuntimeError as e:
            raise MocohubError(f"{path} does not fit this run ({self.cfg.arch}, dim {self.cfg.moco_dim}, "
                               f"{model.describe()}): {str(e).splitlines()[0]} ... pass the flags it was trained "
                               "with") from e
        optimizer.load_state_dict(fit_optimizer_state(state["optimizer"], model, optimizer))
        for group in optimizer.param_groups:  # this run's flags, not the file's, drive the update
            group.update(self.algo.hyper)

    def restore(self, path: Path, *, main: bool) -> EpochSums:
        """Continue from ``path``: a mocohub checkpoint to the step (with the epoch's sums so far), an
        official one at its epoch (the next one to run). The lr and m follow from the position."""
        try:
            state = load_checkpoint(path, generation=self.algo.model.generation)
        except MocohubError as e:
            hint = "" if self.cfg.resume else (" (pass --restart to start this run folder over; the file is "
                                                "kept aside, not deleted)")
            raise MocohubError(f"{e}{hint}") from e
        extra = state.get("mocohub") or {}
        if extra:
            self._check_resume(path, extra, main)
        self._load_weights(path, state)
        self.epoch = int(state["epoch"])
        scaler = extra.get("scaler") or state.get("scaler")
        if self.scaler.is_enabled() and scaler:
            self.scaler.load_state_dict(scaler)
        if extra:
            set_rng_state(extra["rng"])
            self.step_in_epoch = int(extra["step_in_epoch"])
        self.algo.schedule(self.global_step)
        return EpochSums.from_dict(extra.get("epoch_sums") if self.step_in_epoch else None)
