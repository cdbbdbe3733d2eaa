"""RUN_DIR/run.json: the choices a run made at start, for tools, and the start lines drawn from it.

Written by the main process after every check has passed (each start rewrites it: a resumed run
may run on other hardware). Tools read it instead of parsing the human lines.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..fileio import atomic_write

__all__ = ["run_record", "read_record", "write_record", "start_lines"]


def run_record(trainer: Any) -> dict[str, Any]:
    """The choices ``trainer`` (a ``Trainer``) made at start, and its ``--time-budget`` plan."""
    t = trainer
    return {"precision": t.precision, "precision_why": t.precision_why,
            "memory_format": "channels-last" if t.channels_last else "NCHW",
            "device": str(t.rt.device), "device_type": t.rt.device.type, "world_size": t.rt.world,
            "workers": t.input.workers, "aug_impl": t.input.aug_impl, "aug_device": str(t.input.aug_device),
            "bn_splits": t.bn_splits, "steps_per_epoch": t.sampler.steps, "images": len(t.input.dataset),
            "cache_images": t.cfg.cache_images, "image_cache": t.input.dataset.cache_note,
            "moco_version": t.cfg.moco_version, "recipe": t.cfg.recipe, "plan": t.plan}


def write_record(path: Path, record: dict[str, Any]) -> None:
    """``record`` (the trainer's choices) plus the versions and the start time, atomically."""
    full = {**record, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mocohub_version": __version__,
            "torch_version": torch.__version__}
    text = json.dumps(full, indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_record(path: Path) -> dict[str, Any]:
    """A run's record ({} for a run from before records)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def start_lines(record: dict[str, Any], *, summary: str, batch_norm: str, arch: str, data: str, image_size: int,
                batch_size: int, run_dir: Path) -> list[str]:
    """What the run is, the precision line (``benchmarks/ablations.py`` once parsed it) and, unless
    ``--cache-images off``, what became of the image cache and why."""
    lines = [f"{summary}: {arch} on {record['images']} images of {data}, {image_size} px, batch {batch_size} over "
             f"{record['world_size']} process(es) on {record['device_type']}, {record['steps_per_epoch']} "
             f"steps/epoch, {batch_norm} -> {run_dir}",
             f"precision {record['precision']} ({record['precision_why']}), {record['memory_format']}"]
    if record.get("cache_images") != "off" and record.get("image_cache"):
        lines.append(record["image_cache"])
    return lines
