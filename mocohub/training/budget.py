"""``--time-budget``: the run that fits the time you have, its schedule spanning exactly that run.

A short probe times the real step on real batches (after warm-up, loading included) and the kNN
monitor's embedding; ``plan_epochs`` (a pure function) turns the times into the most epochs that fit;
``fit_schedule`` stretches the recipe's schedule (step milestones, v3 warmup) onto them. The probe
trains a model that the trainer then builds again from the same random state, so the run is the
one it would have been without the probe. Rank 0 decides and every rank takes its plan.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch.utils.data import Subset
from tqdm.auto import tqdm

from ..evaluation.embeddings import compute_embeddings
from .checkpoint import rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .durations import parse_duration
from .runlog import RunLog
from .state import saved_plan

__all__ = ["parse_duration", "run_seconds", "plan_epochs", "fit_schedule", "probe", "make_plan", "plan_line", "measure_or_fixed",
           "budget_plan", "DRIFT_MARGIN", "STEP_SECONDS_ENV"]

# Tests only: seconds per step to plan with instead of probing (no probe, no other costs), so that a
# test knows the plan in advance.
STEP_SECONDS_ENV = "MOCOHUB_BUDGET_STEP_SECONDS"
WARMUP_STEPS, TIMED_STEPS, KNN_BATCHES = 2, 5, 2
# The share of the budget kept back for drift: over an hour on 2 cores the epochs ran 3.7 % slower than
# the probe's steps (benchmarks/README.md, bench_budget), and a job past its time limit loses its end.
DRIFT_MARGIN = 0.05


def run_seconds(epochs: int, *, step_s: float, steps_per_epoch: int, epoch_s: float = 0.0, knn_s: float = 0.0,
                knn_every: int = 1, fixed_s: float = 0.0) -> float:
    """What ``epochs`` epochs cost, start-up included (``plan_epochs`` says what each term is)."""
    return fixed_s + epochs * (steps_per_epoch * step_s + epoch_s) + knn_s * math.ceil(epochs / knn_every)


def plan_epochs(budget_s: float, *, step_s: float, steps_per_epoch: int, epoch_s: float = 0.0, knn_s: float = 0.0,
                knn_every: int = 1, fixed_s: float = 0.0) -> int:
    """The most epochs (at least 1) whose steps, epoch starts (``epoch_s`` each) and kNN passes (one
    per ``knn_every`` epochs and one after the last, as the trainer runs them) fit in ``budget_s``
    after ``fixed_s`` (what is spent once: start-up, probe, the first steps' warm-up)."""
    def cost(epochs: int) -> float:
        return run_seconds(epochs, step_s=step_s, steps_per_epoch=steps_per_epoch, epoch_s=epoch_s, knn_s=knn_s,
                           knn_every=knn_every, fixed_s=fixed_s)
    per_epoch = steps_per_epoch * step_s + epoch_s + knn_s / knn_every
    epochs = max(1, int((budget_s - fixed_s) / per_epoch)) if per_epoch > 0 else 1
    while epochs > 1 and cost(epochs) > budget_s:
        epochs -= 1
    while cost(epochs + 1) <= budget_s:
        epochs += 1
    return epochs


def fit_schedule(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """``cfg`` over ``epochs``: step milestones and v3's warmup keep their share of the recipe's run
    (warmup below the run's length), so the schedule ends at its final value in the last step."""
    share = epochs / cfg.epochs
    milestones = tuple(sorted({max(1, round(m * share)) for m in cfg.lr_steps}))
    warmup = min(round(cfg.warmup_epochs * share), epochs - 1)
    return replace(cfg, epochs=epochs, lr_steps=milestones, warmup_epochs=warmup)


def _batches(trainer: Any):
    """Real training batches, epoch after epoch (the trainer sets its sampler's epoch again to train);
    yields (seconds from the epoch's loader start to this batch or None, batch)."""
    epoch = 0
    while True:
        trainer.sampler.set_epoch(epoch)
        start = time.perf_counter()
        for i, batch in enumerate(trainer.input.epoch(trainer.sampler, trainer.per_rank, epoch)):
            yield (time.perf_counter() - start if i == 0 else None), batch
        epoch += 1


def _knn_seconds(trainer: Any) -> float:
    """One kNN pass, from the time to embed ``KNN_BATCHES`` batches of the bank after one of warm-up:
    the bank and the queries are embedded once per pass, each rank its share."""
    bank, queries = trainer.input.knn_sets
    batch = trainer.input.knn_batch
    opts = dict(device=trainer.rt.device, precision=trainer.precision, channels_last=trainer.channels_last)
    encoder = trainer.model.query_encoder

    def embed(n: int) -> float:
        loader = trainer.input.loader(Subset(bank, range(min(n, len(bank)))), None, batch, epoch=0, drop_last=False)
        start = time.perf_counter()
        compute_embeddings(encoder, loader, **opts)
        return time.perf_counter() - start
    warm = embed(batch)
    n = min(len(bank), batch * (1 + KNN_BATCHES))
    seconds = (embed(n) - warm) / max(1, n - batch) if n > batch else warm / n
    return seconds * (len(bank) + len(queries)) / trainer.rt.world


def _epoch_end_seconds(trainer: Any) -> float:
    """One epoch's end as rank 0 writes it (the logs' rows, the curves redrawn, the checkpoint synced
    to disk), into a temporary folder beside the run's: it can outweigh a short epoch's steps."""
    if not trainer.rt.main:
        return 0.0
    root = Path(trainer.folder.root).absolute()
    near = next(p for p in (root, *root.parents) if p.is_dir())
    row = {"epoch": 0, "loss": 1.0, "acc1": 0.0, "lr": 0.0}
    with tempfile.TemporaryDirectory(dir=near, prefix=".mocohub-probe-") as tmp:
        start = time.perf_counter()
        with RunLog(tmp) as log:
            log.log_steps([{**row, "step": i, "steps": 1} for i in range(2)])
            log.log_epoch(row)
        save_checkpoint({"state_dict": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()},
                        Path(tmp) / "checkpoint.pth.tar")
        return time.perf_counter() - start


def probe(trainer: Any) -> dict[str, float]:
    """Seconds per step (steady, loading included), per epoch (its loader's start and its end), per
    kNN pass, and the first steps' extra (compilation, allocator, autotuning: paid again by the run),
    timed on the trainer's model with its real step. Every rank takes the same number of steps (the
    step is collective)."""
    trainer.net.train()
    marks, epoch_s, start = [], [], time.perf_counter()
    batches = _batches(trainer)
    for _ in range(WARMUP_STEPS + TIMED_STEPS):
        loader_s, batch = next(batches)
        if loader_s is not None:
            epoch_s.append(loader_s)
        loss, _ = trainer.step(*trainer.input.two_views(batch), trainer.algo.schedule(0)["moco_m"])
        loss.item()  # the step's real end on an asynchronous device
        marks.append(time.perf_counter())
    batches.close()
    step_s = (marks[-1] - marks[WARMUP_STEPS - 1]) / TIMED_STEPS
    first_s = max(0.0, marks[WARMUP_STEPS - 1] - start - WARMUP_STEPS * step_s)
    knn_s = _knn_seconds(trainer) if trainer.cfg.val else 0.0
    return {"step_s": step_s, "epoch_s": min(epoch_s) + _epoch_end_seconds(trainer), "knn_s": knn_s, "first_s": first_s}


def make_plan(cfg: TrainConfig, steps_per_epoch: int, measured: dict[str, float] | None, *, spent_s: float,
              probe_s: float) -> dict:
    """The plan (what run.json and the checkpoint keep): the budget, the epochs and what they came from;
    ``spent_s``: the start-up so far, ``probe_s`` of it the probe's. ``measured`` None: the test hook's
    fixed step time (``STEP_SECONDS_ENV``), nothing else counted."""
    if measured is None:
        measured, spent_s = {"step_s": float(os.environ[STEP_SECONDS_ENV]), "epoch_s": 0.0, "knn_s": 0.0,
                             "first_s": 0.0}, 0.0
    fixed_s = spent_s + measured["first_s"]
    epochs = plan_epochs(cfg.time_budget * (1 - DRIFT_MARGIN), step_s=measured["step_s"],
                         steps_per_epoch=steps_per_epoch, epoch_s=measured["epoch_s"], knn_s=measured["knn_s"],
                         knn_every=cfg.knn_every, fixed_s=fixed_s)
    return {"budget_s": cfg.time_budget, "epochs": epochs, "steps_per_epoch": steps_per_epoch, **measured,
            "knn_every": cfg.knn_every if cfg.val else None, "fixed_s": fixed_s, "probe_s": probe_s}


def _words(seconds: float) -> str:
    """``30 min``, ``1 h 30 min``, ``90 s`` -> ``1 min 30 s``."""
    s = round(seconds)
    parts = [(s // 3600, "h"), (s % 3600 // 60, "min"), (s % 60, "s")]
    return " ".join(f"{n} {unit}" for n, unit in parts if n) or f"{seconds:.1f} s"


def plan_line(plan: dict) -> str:
    """``budget 30 min: 14 epochs of 3,125 steps at 0.12 s/step, kNN every 2 epochs``."""
    knn = plan.get("knn_every")
    every = "" if knn is None else ", kNN every epoch" if knn == 1 else f", kNN every {knn} epochs"
    line = (f"budget {_words(plan['budget_s'])}: {plan['epochs']:,} epoch{'s' * (plan['epochs'] != 1)} of "
            f"{plan['steps_per_epoch']:,} steps at {plan['step_s']:.2g} s/step{every}")
    if plan["epochs"] > 1:  # the planner fitted them in the budget
        return line
    # the one epoch a run always trains may not fit: say so before the user waits past the budget
    seconds = run_seconds(1, step_s=plan["step_s"], steps_per_epoch=plan["steps_per_epoch"],
                          epoch_s=plan.get("epoch_s", 0.0), knn_s=plan.get("knn_s", 0.0), knn_every=knn or 1,
                          fixed_s=plan.get("fixed_s", 0.0))
    if seconds > plan["budget_s"]:
        line += (f"; one epoch takes about {_words(seconds)}, longer than the budget "
                 "(--max-steps N stops after N steps)")
    return line


def measure_or_fixed(trainer: Any) -> dict[str, float] | None:
    """The probe's times, or None where the test hook fixes the step time."""
    return None if os.environ.get(STEP_SECONDS_ENV) else probe(trainer)


def budget_plan(trainer: Any, cfg: TrainConfig, started: float) -> dict[str, Any]:
    """``--time-budget``: the checkpoint's plan when resuming (the run keeps its epochs), else
    rank 0's from a probe of this run's own step, on a model built again afterwards from the
    same random state (the run is the one it would have been without the probe)."""
    resume = Path(cfg.resume) if cfg.resume else None if cfg.restart else trainer.folder.checkpoint
    plan = saved_plan(resume) if resume else None
    if plan is not None:
        if plan["budget_s"] != cfg.time_budget and trainer.rt.main:
            tqdm.write(f"resuming a run that keeps its plan ({plan_line(plan)}): --time-budget "
                       f"{cfg.time_budget:g} s is ignored")
        return plan
    rng, built = rng_state(), time.monotonic()
    trainer._build(cfg)
    build_s = time.monotonic() - built
    measured = measure_or_fixed(trainer)
    set_rng_state(rng)
    now = time.monotonic()  # the start-up so far, and the second build to come
    plan = make_plan(cfg, trainer.sampler.steps, measured,
                     spent_s=now - started + build_s, probe_s=now - built)
    return trainer.rt.broadcast(plan if trainer.rt.main else None)
