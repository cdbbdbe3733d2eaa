"""The run folder that ``mocohub train`` writes, defined once: its file names and what each holds.

The trainer writes it; the zoo (``from_pretrained(RUN_DIR)``), ``mocohub plot``, ``mocohub info``
and the ablations read it. This module imports nothing of mocohub, so every layer may use it.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CHECKPOINT", "METRICS", "STEPS", "CURVES", "TENSORBOARD", "BACKBONE", "RECORD", "LOCK", "OUTPUTS",
           "RunFolder"]

CHECKPOINT = "checkpoint.pth.tar"  # the official layout of the run's generation, plus a "mocohub" entry
METRICS = "metrics.jsonl"          # one JSON row per epoch: loss, accuracy, lr, images/s, skipped, kNN
STEPS = "steps.jsonl"              # one JSON row every --log-every steps: mean loss, accuracy, lr (v3: moco_m)
CURVES = "curves.png"              # the metrics drawn (needs matplotlib)
TENSORBOARD = "tensorboard"        # the same scalars for TensorBoard (--tensorboard)
BACKBONE = "backbone"              # the export: model.safetensors + config.json + model card
RECORD = "run.json"                # the choices made at start (precision and why, device, ...), for tools
LOCK = ".lock"                     # held while a trainer runs in the folder
# what one run writes: ``--restart`` moves these aside
OUTPUTS = (CHECKPOINT, METRICS, STEPS, BACKBONE, CURVES, TENSORBOARD, RECORD)


class RunFolder:
    """Paths of one run folder's files (``RunFolder(run_dir).checkpoint``, ...)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.checkpoint, self.metrics, self.steps = self.root / CHECKPOINT, self.root / METRICS, self.root / STEPS
        self.curves, self.tensorboard, self.backbone = self.root / CURVES, self.root / TENSORBOARD, self.root / BACKBONE
        self.record, self.lock = self.root / RECORD, self.root / LOCK

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"
