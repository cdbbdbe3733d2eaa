"""The MoCo training loop, v1/v2 and v3 alike: one process or many under torchrun (DDP), resumable to the step.

The rooms: ``validate`` refuses impossible runs, ``pipeline`` makes the two views, ``algorithms``
holds the generation's model and schedules (both models answer the same calls), ``state`` captures
and restores checkpoints, ``meter`` measures and reports, ``stop`` agrees on when to stop, and
``record`` writes the choices made at start. What stays here is the loop, as in Algorithm 1 of
the MoCo paper: per batch, two views, a step of the encoder, the momentum update inside it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..precision import autocast, resolve_channels_last, resolve_precision
from ..run_folder import OUTPUTS, RunFolder
from ..zoo.pretrained import build_config, write_pretrained
from .algorithms import build_algorithm
from .budget import budget_plan, plan_line, planned_config, replan_line
from .config import TrainConfig
from .meter import EpochSums, StepMeter, epoch_line
from .microbatch import micro_step
from .monitor import sharded_knn
from .pipeline import InputPipeline
from .record import run_record, start_lines, write_record
from .runlog import RunLog
from .run_dir import RunLock, fresh_run_dir, prepare_run_dir, set_aside
from .runtime import Runtime
from .sampler import ResumableSampler
from .state import TrainState
from .stop import StopGuard
from .sync import broadcast_buffers
from .validate import validate

__all__ = ["Trainer", "train"]


class Trainer:
    """Holds a run's state; ``fit()`` runs it. Use ``train(cfg)`` unless you need the pieces."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.rt = cfg, Runtime(cfg.device)
        self.lock = self.log = self.meter = None
        try:
            self._setup(cfg)
        except BaseException:  # a refused start must not leave the process group or the lock behind
            self.close()
            raise

    def _setup(self, cfg: TrainConfig) -> None:
        rt, started = self.rt, time.monotonic()
        self.bn_splits = validate(cfg, rt.world, rt.device)
        self.precision, self.precision_why = resolve_precision(cfg.precision, rt.device)
        self.channels_last = resolve_channels_last(cfg.channels_last, self.precision)
        self.folder = RunFolder(rt.broadcast(str(cfg.out or fresh_run_dir(cfg.recipe, cfg.arch))))
        torch.manual_seed(cfg.seed)
        self.per_rank = cfg.batch_size // rt.world
        self.input = InputPipeline(cfg, rt.device, self.channels_last, self.per_rank,
                                   barrier=rt.barrier if rt.world > 1 else None)
        self.sampler = ResumableSampler(len(self.input.dataset), cfg.batch_size, num_replicas=rt.world,
                                        rank=rt.rank, seed=cfg.seed)
        self.plan, self.replanner = budget_plan(self, cfg, started) if cfg.time_budget is not None else (None, None)
        if self.plan is not None:
            cfg = self.cfg = planned_config(cfg, self.plan)
        self._build(cfg)
        self.state = TrainState(cfg, self.algo, self.scaler, world=rt.world, data_id=self.input.fingerprint,
                                steps_per_epoch=self.sampler.steps, plan=self.plan)
        self._open_folder()
        self.guard = StopGuard(rt, self.folder.checkpoint, self.precision)

    def _build(self, cfg: TrainConfig) -> None:
        """The model, its optimiser and schedules (over ``cfg.epochs``), the scaler and the DDP wrapper."""
        rt = self.rt
        # SyncBatchNorm (MoCo v3 under DDP, as the official) needs CUDA tensors: on gloo/CPU each
        # process normalises its own batch with plain BN
        self.algo = build_algorithm(cfg, steps_per_epoch=self.sampler.steps, bn_splits=self.bn_splits,
                                    device=rt.device, sync_bn=rt.world > 1 and rt.device.type == "cuda")
        self.model, self.optimizer = self.algo.model, self.algo.optimizer
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if cfg.compile:  # in place: the state-dict names stay the official ones
            for encoder in self.model.encoders:
                encoder.compile()
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=self.precision == "fp16")
        self.net = self.model
        if rt.world > 1:
            self.net = DistributedDataParallel(self.model, device_ids=[rt.device.index] if rt.device.type == "cuda"
                                               else None)

    def _open_folder(self) -> None:
        """Rank 0 takes the folder (nothing is written before every check above has passed), sets an
        earlier run aside on --restart, records the choices, and every rank resumes what is there."""
        cfg, rt = self.cfg, self.rt
        if rt.main:
            prepare_run_dir(self.folder.root)
            self.lock = RunLock(self.folder.root)
            aside = set_aside(self.folder.root, list(OUTPUTS)) if cfg.restart else None
            if aside:
                tqdm.write(f"--restart: the earlier run's files are kept in {aside}")
            self.log = RunLog(self.folder.root, tensorboard=cfg.tensorboard)
        rt.barrier()  # the folder is set up (or set aside) before any rank looks for a checkpoint
        resume = Path(cfg.resume) if cfg.resume else self.folder.checkpoint
        sums = self.state.restore(resume, main=rt.main) if cfg.resume or resume.exists() else None
        if rt.main:
            if sums is not None:
                self.log.trim(self.state.global_step, self.state.epoch)
                tqdm.write(f"resumed from {resume} at epoch {self.state.epoch}, step {self.state.step_in_epoch}")
            write_record(self.folder.record, run_record(self))
        self.meter = StepMeter(rt, self.log, log_every=cfg.log_every, steps_per_epoch=self.sampler.steps,
                               images_per_step=cfg.batch_size, listed_non_images=len(self.input.dataset.skipped),
                               progress=cfg.progress)
        self.resumed_sums = sums or EpochSums()
        rt.barrier()  # rank 0 has set the folder up (or refused) before anyone trains

    # -- the loop ------------------------------------------------------------------------------
    def step(self, im_q: torch.Tensor, im_k: torch.Tensor, m: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step of either generation: InfoNCE of the two views, SGD (or LARS/AdamW)
        on the query encoder; the key encoder's momentum update with ``m`` is inside the model.
        With ``--micro-batch`` the forward and backward go in chunks (``microbatch.micro_step``)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.micro_batch:
            loss, acc = micro_step(self.model, im_q, im_k, m, self.cfg.micro_batch,
                                   backward=lambda t: self.scaler.scale(t).backward(),
                                   autocast=lambda: autocast(self.rt.device, self.precision))
        else:
            with autocast(self.rt.device, self.precision):
                loss, logits, labels = self.algo.forward(self.net, im_q, im_k, m)
            self.scaler.scale(loss).backward()
            acc = (logits.argmax(dim=1) == labels).float().mean()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), acc.detach()

    def _train_epoch(self) -> bool:
        """Train to the end of the epoch or an agreed stop; whether the epoch ended."""
        state, meter, steps = self.state, self.meter, self.sampler.steps
        self.net.train()
        self.sampler.set_epoch(state.epoch, start_step=state.step_in_epoch)
        meter.start_epoch(state.epoch, state.step_in_epoch, self.resumed_sums)
        self.resumed_sums = None
        for batch in self.input.epoch(self.sampler, self.per_rank, state.epoch):
            schedule = self.algo.schedule(state.global_step)  # lr and m of this step
            loss, acc = self.step(*self.input.two_views(batch), schedule["moco_m"])
            meter.add(state.global_step, schedule, loss, acc, batch.failed)
            state.step_in_epoch += 1
            limit = self.cfg.max_steps is not None and state.global_step >= self.cfg.max_steps
            if meter.due(state.step_in_epoch == steps or limit) or self.guard.flush_now:
                if self.guard.agree(meter.flush(), state.epoch) or limit:
                    break
        return state.step_in_epoch == steps

    def _finished(self) -> bool:
        cfg, state = self.cfg, self.state
        return state.epoch >= cfg.epochs or self.guard.interrupted or (
            cfg.max_steps is not None and state.global_step >= cfg.max_steps)

    def fit(self) -> Path:
        """Train to ``cfg.epochs`` (or ``max_steps``), checkpointing each epoch; export the backbone."""
        cfg, state, metrics = self.cfg, self.state, {}  # a re-plan changes self.cfg's epochs (``_replan``)
        if self.rt.main:
            for line in start_lines(run_record(self), summary=self.algo.summary, batch_norm=self.algo.batch_norm,
                                    arch=cfg.arch, data=cfg.data, image_size=cfg.image_size,
                                    batch_size=cfg.batch_size, run_dir=self.folder.root) + self.input.checks.lines:
                tqdm.write(line)
            if self.plan is not None:
                tqdm.write(plan_line(self.plan))
        try:
            with self.guard:
                while not self._finished():
                    if not self._train_epoch():  # stopped inside the epoch: checkpoint to the step
                        self._save(self.meter.capture())
                        break
                    row = self.meter.end_epoch()
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                    if cfg.val and (state.epoch % cfg.knn_every == 0 or state.epoch == self.cfg.epochs):
                        metrics = self._knn()
                        row.update(metrics)
                    if self.rt.main:
                        self.log.log_epoch(row)
                        tqdm.write(epoch_line(row, self.cfg.epochs))
                    if self.replanner and (plan := self.replanner.epoch_end(state.epoch)):
                        self._replan(plan)
                    # The row first, then the checkpoint: a kill between them resumes from the previous
                    # checkpoint, which trims the row and writes it again; the other order lost it.
                    self._save(EpochSums())
            self.rt.barrier()  # rank 0's checkpoint is on disk before any process leaves
            if self.guard.interrupted:  # the CLI names the folder in its resume hint
                raise KeyboardInterrupt(str(self.folder.root))
            out = self._export(metrics) if self.rt.main else self.folder.backbone
            self.rt.barrier()
            return out
        finally:
            self.close()

    def _replan(self, plan: dict[str, Any]) -> None:
        """The budget's epochs made again from the run's own (``budget.Replanner``), kept by run.json
        and the checkpoints: the schedules span them from the next step on."""
        self.plan = self.state.plan = plan
        self.cfg = self.state.cfg = planned_config(self.cfg, plan)
        self.algo.reschedule(self.cfg, self.sampler.steps)
        if self.rt.main:
            write_record(self.folder.record, run_record(self))
            tqdm.write(replan_line(plan))

    def _save(self, sums: EpochSums) -> None:
        if self.rt.main:
            self.state.save(self.folder.checkpoint, sums)

    def _knn(self) -> dict[str, float]:
        """Every rank embeds its share (see ``sharded_knn``) with rank 0's BN statistics."""
        encoder, cfg = self.model.query_encoder, self.cfg
        broadcast_buffers(self.rt, encoder)
        bank, queries = self.input.knn_sets
        def make_loader(dataset):
            return self.input.loader(dataset, None, self.input.knn_batch, epoch=self.state.epoch, drop_last=False)
        return sharded_knn(self.rt, encoder, bank, queries, make_loader, len(bank.classes), dim=cfg.moco_dim,
                           k=cfg.knn_k, t=cfg.knn_t, precision=self.precision, channels_last=self.channels_last)

    def _export(self, metrics: dict[str, Any]) -> Path:
        """The query encoder's backbone as a timm/``from_pretrained`` folder, with the run's metrics."""
        cfg, built = self.cfg, self.model.backbone_config()
        meta = {"moco_version": cfg.moco_version, "recipe": cfg.recipe, "epochs": self.state.epoch,
                "source": "mocohub train", "dataset": Path(self.input.dataset.root).name, **metrics}
        config = build_config(built["architecture"], num_features=built["num_features"], stem=built["stem"],
                              pretrained_cfg={**self.input.eval_cfg, **built["pretrained_cfg"]}, meta=meta)
        config["model_args"] = built["model_args"]
        return write_pretrained(self.folder.backbone, self.model.backbone_state_dict(), config)

    def close(self) -> None:
        """Release the run folder and the process group (also after a failed start)."""
        if self.meter is not None:
            self.meter.close()
        if self.log is not None:
            self.log.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        self.rt.close()


def train(cfg: TrainConfig) -> Path:
    """Run MoCo (v1, v2 or v3) pre-training as ``cfg`` says; return the exported backbone folder."""
    return Trainer(cfg).fit()
