"""``--time-budget``: the run that fits the time you have, its schedule spanning exactly that run.

A short probe times the real step on real batches (after warm-up, loading included) and the kNN
monitor's embedding; ``plan_epochs`` (a pure function) turns the times into the most epochs that fit;
``fit_schedule`` stretches the recipe's schedule (step milestones, v3 warmup) onto them. The probe
trains a model that the trainer then builds again from the same random state, so the run is the
one it would have been without the probe. A few steps of probe err by 4-10 % over an hour on a
shared machine, so a fresh run re-plans once, about a quarter in, from its own epochs
(``Replanner``). Rank 0 decides and every rank takes its plan.
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

__all__ = ["parse_duration", "epoch_seconds", "run_seconds", "plan_epochs", "fit_schedule", "planned_config", "probe", "make_plan",
           "plan_line", "measure_or_fixed", "budget_plan", "replan_epoch", "replan", "replan_line", "Replanner",
           "DRIFT_MARGIN", "REPLAN_SHARE", "STEP_SECONDS_ENV", "EPOCH_SECONDS_ENV"]

# Tests only: seconds per step to plan with instead of probing (no probe, no other costs), so that a
# test knows the plan in advance.
STEP_SECONDS_ENV = "MOCOHUB_BUDGET_STEP_SECONDS"
# Tests only, with STEP_SECONDS_ENV: the seconds each epoch took when the run re-plans (a fake clock;
# unset, the epochs took what was planned and the plan holds).
EPOCH_SECONDS_ENV = "MOCOHUB_BUDGET_EPOCH_SECONDS"
WARMUP_STEPS, TIMED_STEPS, KNN_BATCHES = 2, 5, 2
# The share of the budget kept back for drift: over an hour on 2 cores the epochs ran 3.7 % slower than
# the probe's steps (benchmarks/README.md, bench_budget), and a job past its time limit loses its end.
DRIFT_MARGIN = 0.05
# Where the one re-plan comes: late enough to time several whole epochs (and kNN cycles), early
# enough that most of the schedule is still ahead to span the budget.
REPLAN_SHARE = 0.25


def epoch_seconds(*, step_s: float, steps_per_epoch: int, epoch_s: float = 0.0, knn_s: float = 0.0,
                  knn_every: int = 1) -> float:
    """One epoch's share of the run: its steps, its start and end, and its part of the kNN passes."""
    return steps_per_epoch * step_s + epoch_s + knn_s / knn_every


def run_seconds(epochs: int, *, step_s: float, steps_per_epoch: int, epoch_s: float = 0.0, knn_s: float = 0.0,
                knn_every: int = 1, fixed_s: float = 0.0, start: int = 0) -> float:
    """What training epochs ``start`` + 1 to ``epochs`` costs after ``fixed_s`` (``plan_epochs`` says
    what each term is)."""
    passes = math.ceil(epochs / knn_every) - start // knn_every
    return fixed_s + (epochs - start) * (steps_per_epoch * step_s + epoch_s) + knn_s * passes


def plan_epochs(budget_s: float, *, step_s: float, steps_per_epoch: int, epoch_s: float = 0.0, knn_s: float = 0.0,
                knn_every: int = 1, fixed_s: float = 0.0, start: int = 0) -> int:
    """The most epochs (at least ``start`` + 1) whose steps, epoch starts (``epoch_s`` each) and kNN
    passes (one per ``knn_every`` epochs and one after the last, as the trainer runs them) fit in
    ``budget_s`` after ``fixed_s`` (what is spent already or once: start-up, probe, the first steps'
    warm-up; on a re-plan, the ``start`` epochs trained)."""
    def cost(epochs: int) -> float:
        return run_seconds(epochs, step_s=step_s, steps_per_epoch=steps_per_epoch, epoch_s=epoch_s, knn_s=knn_s,
                           knn_every=knn_every, fixed_s=fixed_s, start=start)
    per_epoch = epoch_seconds(step_s=step_s, steps_per_epoch=steps_per_epoch, epoch_s=epoch_s, knn_s=knn_s,
                              knn_every=knn_every)
    epochs = start + (max(1, int((budget_s - fixed_s) / per_epoch)) if per_epoch > 0 else 1)
    while epochs > start + 1 and cost(epochs) > budget_s:
        epochs -= 1
    while cost(epochs + 1) <= budget_s:
        epochs += 1
    return epochs


def fit_schedule(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """``cfg`` over ``epochs``: step milestones and v3's warmup keep their share of the recipe's run
    (warmup below the run's length), so the schedule ends at its final value in the last step. Fitting
    a fitted ``cfg`` again to its own epochs changes nothing."""
    share = epochs / cfg.epochs
    milestones = tuple(sorted({max(1, round(m * share)) for m in cfg.lr_steps}))
    warmup = min(round(cfg.warmup_epochs * share), epochs - 1)
    return replace(cfg, epochs=epochs, lr_steps=milestones, warmup_epochs=warmup)


def planned_config(cfg: TrainConfig, plan: dict[str, Any]) -> TrainConfig:
    """``cfg`` on ``plan``: fitted to the first plan's epochs, then, after a re-plan, the milestones
    and warmup still ahead of it stretched onto the new epochs (what has passed stays as it was)."""
    again = plan.get("replan")
    fitted = fit_schedule(cfg, again["from_epochs"] if again else plan["epochs"])
    if again:
        after, share = again["after_epoch"], plan["epochs"] / fitted.epochs

        def ahead(epoch: int) -> int:
            return epoch if epoch <= after else max(after + 1, round(epoch * share))
        fitted = replace(fitted, epochs=plan["epochs"], lr_steps=tuple(sorted({ahead(m) for m in fitted.lr_steps})),
                         warmup_epochs=min(ahead(fitted.warmup_epochs), plan["epochs"] - 1))
    return replace(fitted, time_budget=plan["budget_s"])


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
    if seconds < 10:
        return f"{seconds:.2g} s"
    s = round(seconds)
    parts = [(s // 3600, "h"), (s % 3600 // 60, "min"), (s % 60, "s")]
    return " ".join(f"{n} {unit}" for n, unit in parts if n)


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


def replan_epoch(epochs: int, knn_every: int | None) -> int | None:
    """The epoch after which a run planned for ``epochs`` re-plans (None: too short to): about
    ``REPLAN_SHARE`` in, timing the epochs after the first (warm-up, caches) in whole kNN cycles."""
    every = knn_every or 1
    after = 1 + every * max(1, round((epochs * REPLAN_SHARE - 1) / every))
    return after if after < epochs else None


def replan(plan: dict[str, Any], *, after_epoch: int, epoch_s: float, elapsed_s: float) -> dict[str, Any]:
    """``plan`` made again at the end of epoch ``after_epoch``, ``elapsed_s`` into the budget, from what
    the epochs since the first cost (``epoch_s`` each, their kNN passes included; the last pass can
    be off by one, which the drift margin holds): the most epochs that fit, at least one more."""
    steps = plan["steps_per_epoch"]
    epochs = plan_epochs(plan["budget_s"] * (1 - DRIFT_MARGIN), step_s=epoch_s / steps, steps_per_epoch=steps,
                         fixed_s=elapsed_s, start=after_epoch)
    return {**plan, "epochs": epochs, "replan": {"after_epoch": after_epoch, "from_epochs": plan["epochs"],
                                                 "epoch_s": epoch_s, "elapsed_s": elapsed_s}}


def replan_line(plan: dict[str, Any]) -> str:
    """``re-planned after epoch 9: 1 min 33 s per epoch (probed: 1 min 43 s), 32 epochs in all, not 29``."""
    again = plan["replan"]
    probed = epoch_seconds(step_s=plan["step_s"], steps_per_epoch=plan["steps_per_epoch"],
                           epoch_s=plan.get("epoch_s", 0.0), knn_s=plan.get("knn_s", 0.0),
                           knn_every=plan.get("knn_every") or 1)
    epochs = f"{plan['epochs']} epochs in all, not {again['from_epochs']}" if plan["epochs"] != again["from_epochs"] \
        else f"the plan of {plan['epochs']} epochs holds"
    return (f"re-planned after epoch {again['after_epoch']}: {_words(again['epoch_s'])} per epoch "
            f"(probed: {_words(probed)}), {epochs}")


class Replanner:
    """A fresh budgeted run's one re-plan (a resumed run keeps its plan): rank 0 times the epochs
    after the first on its clock, and every rank takes its plan."""

    def __init__(self, plan: dict[str, Any], started: float, rt: Any):
        self.plan, self.started, self.rt = plan, started, rt
        self.after = replan_epoch(plan["epochs"], plan["knn_every"])
        self.first_end = 0.0

    def epoch_end(self, epoch: int) -> dict[str, Any] | None:
        """After ``epoch`` (its kNN pass done, every rank): the new plan when it is time, else None."""
        if epoch == 1:
            self.first_end = time.monotonic()
        if epoch != self.after:
            return None
        return self.rt.broadcast(self._replan(epoch) if self.rt.main else None)

    def _replan(self, epoch: int) -> dict[str, Any]:
        if os.environ.get(STEP_SECONDS_ENV):  # the tests' fake clock
            epoch_s = float(os.environ.get(EPOCH_SECONDS_ENV) or self.plan["steps_per_epoch"] * self.plan["step_s"])
            return replan(self.plan, after_epoch=epoch, epoch_s=epoch_s, elapsed_s=epoch * epoch_s)
        now = time.monotonic()
        return replan(self.plan, after_epoch=epoch, epoch_s=(now - self.first_end) / (epoch - 1),
                      elapsed_s=now - self.started)


def measure_or_fixed(trainer: Any) -> dict[str, float] | None:
    """The probe's times, or None where the test hook fixes the step time."""
    return None if os.environ.get(STEP_SECONDS_ENV) else probe(trainer)


def budget_plan(trainer: Any, cfg: TrainConfig, started: float) -> tuple[dict[str, Any], Replanner | None]:
    """``--time-budget``: the checkpoint's plan when resuming (the run keeps its epochs), else
    rank 0's from a probe of this run's own step, on a model built again afterwards from the
    same random state (the run is the one it would have been without the probe), and its re-plan."""
    resume = Path(cfg.resume) if cfg.resume else None if cfg.restart else trainer.folder.checkpoint
    plan = saved_plan(resume) if resume else None
    if plan is not None:
        if plan["budget_s"] != cfg.time_budget and trainer.rt.main:
            tqdm.write(f"resuming a run that keeps its plan ({plan_line(plan)}): --time-budget "
                       f"{cfg.time_budget:g} s is ignored")
        return plan, None
    rng, built = rng_state(), time.monotonic()
    trainer._build(cfg)
    build_s = time.monotonic() - built
    measured = measure_or_fixed(trainer)
    set_rng_state(rng)
    now = time.monotonic()  # the start-up so far, and the second build to come
    plan = make_plan(cfg, trainer.sampler.steps, measured,
                     spent_s=now - started + build_s, probe_s=now - built)
    plan = trainer.rt.broadcast(plan if trainer.rt.main else None)
    return plan, Replanner(plan, started, trainer.rt)
