"""The MoCo training loop, v1/v2 and v3 alike: one process or many under torchrun (DDP), resumable to the step.

What differs between the generations (model, optimiser, schedules, the step's call) is in ``algorithms``."""
from __future__ import annotations

import math
import os
import shutil
import signal
import statistics
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..cli.output import duration, pct
from ..backbones import STEMS
from ..data.augment import AUGMENTATIONS, two_views
from ..data.batched import BatchedTwoViews
from ..data.folder import DEFAULT_WORKERS, ImageFolder, collate_images
from ..errors import MocohubError
from ..jsonlog import METRICS_NAME, STEPS_NAME
from ..plotting import CURVES_NAME
from ..precision import PRECISION_CHOICES, autocast, resolve_channels_last, resolve_precision
from ..zoo.pretrained import RUN_EXPORT, build_config, pretrained_cfg_for, write_pretrained
from ..zoo.transforms import transform_for
from .algorithms import build_algorithm, check_generation, fit_optimizer_state
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .monitor import sharded_knn
from .resume import config_differences, data_fingerprint
from .runlog import TENSORBOARD_DIR, RunLog
from .run_dir import RunLock, fresh_run_dir, prepare_run_dir, set_aside
from .runtime import Runtime
from .sampler import ResumableSampler

__all__ = ["train", "BACKBONE_DIR", "METRICS_NAME", "STEPS_NAME"]

BACKBONE_DIR = RUN_EXPORT


def _check_config(cfg: TrainConfig, world: int) -> int:
    """Reject impossible settings before anything is written; return the per-rank BN splits."""
    if cfg.aug not in AUGMENTATIONS:
        raise MocohubError(f"unknown augmentation {cfg.aug!r}; valid: {', '.join(AUGMENTATIONS)}")
    if cfg.stem not in STEMS:
        raise MocohubError(f"unknown stem {cfg.stem!r}; valid: {', '.join(STEMS)}")
    if cfg.schedule not in ("cos", "step"):
        raise MocohubError(f"unknown schedule {cfg.schedule!r}; valid: cos, step")
    if cfg.precision not in PRECISION_CHOICES:
        raise MocohubError(f"unknown precision {cfg.precision!r}; valid: {', '.join(PRECISION_CHOICES)}")
    if cfg.batch_size % world:
        raise MocohubError(f"--batch-size {cfg.batch_size} is the global batch and must be divisible by "
                           f"the {world} processes")
    per_rank = cfg.batch_size // world
    check_generation(cfg, per_rank)
    if cfg.moco_version == "v3":  # plain BN per process (SyncBatchNorm under DDP on GPUs): no splits
        if cfg.bn_splits is not None:
            raise MocohubError("--bn-splits: MoCo v3 normalises over each process's batch (synchronised over "
                               "GPUs under DDP), not in splits: drop the flag")
        return 1
    enqueued = cfg.batch_size * (2 if cfg.symmetric else 1)  # --symmetric enqueues both views' keys
    if cfg.moco_k % enqueued:
        why = "twice the global batch size (--symmetric)" if cfg.symmetric else "the global batch size"
        raise MocohubError(f"--moco-k {cfg.moco_k} must be divisible by {why} {enqueued} (the queue advances "
                           "by the keys of a whole step)")
    if cfg.bn_splits is None:  # bn_groups over all processes, of at least 32 images each (8 GPUs x 32)
        target = max(1, cfg.bn_groups // world)
        return max(d for d in range(1, target + 1) if per_rank % d == 0 and (d == 1 or per_rank // d >= 32))
    if cfg.bn_splits < 1 or per_rank % cfg.bn_splits:
        raise MocohubError(f"the per-process batch {per_rank} is not divisible by {cfg.bn_splits} BN "
                           "splits: set --bn-splits to a divisor of it")
    return cfg.bn_splits


def _require_compiler(device: torch.device) -> None:
    """Inductor writes C++ on the CPU: name a missing compiler now, not deep inside the first step."""
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++")
                                        if c):
        raise MocohubError("--compile on the CPU needs a C++ compiler (g++ or clang++, e.g. apt-get install g++); "
                           "or drop --compile")


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """Ctrl-C and SIGTERM reach a whole process group; loader workers ignore them so the trainer
    can finish its step, checkpoint and shut them down (instead of dying under it mid-step)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _moco_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"module.{k}": v for k, v in model.state_dict().items()}


class Trainer:
    """Holds a run's state; ``fit()`` runs it. Use ``train(cfg)`` unless you need the pieces."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rt = Runtime(cfg.device)
        self.lock = self.log = None
        try:
            self._setup(cfg)
        except BaseException:  # a refused start must not leave the process group or the lock behind
            self.close()
            raise

    def _setup(self, cfg: TrainConfig) -> None:
        self.bn_splits = _check_config(cfg, self.rt.world)
        if cfg.compile:
            _require_compiler(self.rt.device)
        self.precision, self.precision_why = resolve_precision(cfg.precision, self.rt.device)
        self.channels_last = resolve_channels_last(cfg.channels_last, self.precision)
        self.run_dir = Path(self.rt.broadcast(str(cfg.out or fresh_run_dir(cfg.recipe, cfg.arch))))
        torch.manual_seed(cfg.seed)
        self.aug_impl, self.aug_device = self._choose_augmentation()
        views = (BatchedTwoViews if self.aug_impl == "batched" else two_views)(cfg.aug, cfg.image_size, crop_min=cfg.crop_min)
        self.views = views if self.aug_impl == "batched" else None
        self.dataset = ImageFolder(cfg.data, views, seed=cfg.seed, cache_images=cfg.cache_images)
        self.workers = self._choose_workers()
        self.data_id = data_fingerprint(cfg.data, (p for p, _ in self.dataset.samples))
        # evaluation preprocessing: the recipe's normalisation at the training crop size
        self.eval_cfg = pretrained_cfg_for(cfg.image_size, *AUGMENTATIONS[cfg.aug][2])
        self.knn_sets = self._knn_datasets() if cfg.val else None
        self.per_rank = cfg.batch_size // self.rt.world
        if self.rt.device.type == "cpu" and self.per_rank * cfg.image_size ** 2 > 64 * 224 ** 2:
            warnings.warn(f"training on the CPU with {self.per_rank} images of {cfg.image_size} px per step needs "
                          "tens of GB of memory and hours per epoch; for a first CPU run use --recipe cifar "
                          "or cifar-v3, or a smaller --batch-size (v1/v2: and --moco-k a multiple of it)", stacklevel=3)
        if len(self.dataset) < cfg.batch_size:
            raise MocohubError(f"{cfg.data} has {len(self.dataset)} images, fewer than one batch of "
                               f"{cfg.batch_size}: lower --batch-size (v1/v2: and --moco-k to a multiple of it)")
        if self.rt.main:  # nothing is written before every check above has passed
            prepare_run_dir(self.run_dir)
            self.lock = RunLock(self.run_dir)
            self.log = RunLog(self.run_dir, tensorboard=cfg.tensorboard)
        resume = self._resume_path()
        self.sampler = ResumableSampler(len(self.dataset), cfg.batch_size, num_replicas=self.rt.world,
                                        rank=self.rt.rank, seed=cfg.seed)
        self.steps_per_epoch = self.sampler.steps
        # SyncBatchNorm (MoCo v3 under DDP, as the official) needs CUDA tensors: on gloo/CPU each
        # process normalises its own batch with plain BN
        self.algo = build_algorithm(cfg, steps_per_epoch=self.steps_per_epoch, bn_splits=self.bn_splits,
                                    device=self.rt.device, sync_bn=self.rt.world > 1 and self.rt.device.type == "cuda")
        self.model, self.optimizer, self.scheduler = self.algo.model, self.algo.optimizer, self.algo.scheduler
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if cfg.compile:  # in place: the state-dict names stay the official ones
            for encoder in self.algo.encoders:
                encoder.compile()
        self.scaler = torch.amp.GradScaler(self.rt.device.type, enabled=self.precision == "fp16")
        self.net = self.model
        if self.rt.world > 1:
            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.epoch, self.step_in_epoch, self.failed_seen = 0, 0, set()
        self._stop_signal: int | None = None
        self.interrupted = False
        if resume is not None:
            self._load(resume)
        self.rt.barrier()  # rank 0 has set the folder up (or refused) before anyone trains

    def _choose_augmentation(self) -> tuple[str, torch.device]:
        """Batched tensor ops (crops in the loader, the photometric ops on ``aug_device``) or PIL per
        image in the loader workers. Auto is batched everywhere: a GPU outruns the PIL workers, and
        on 2 CPU cores a run trained x1.6 (fp32, AVX2) to x1.9 (bf16, AMX) faster (benchmarks/README)."""
        cfg, device = self.cfg, self.rt.device
        impl = "batched" if cfg.aug_impl == "auto" else cfg.aug_impl
        if impl not in ("pil", "batched"):
            raise MocohubError(f"unknown --aug-impl {cfg.aug_impl!r}; valid: auto, pil, batched")
        if cfg.aug_device in (None, "auto"):
            return impl, device
        if cfg.aug_device.startswith("cuda") and not torch.cuda.is_available():
            raise MocohubError(f"--aug-device {cfg.aug_device}: no CUDA GPU is visible here; use --aug-device cpu "
                               "or auto")
        if impl != "batched":
            raise MocohubError("--aug-device applies to the batched augmentation: add --aug-impl batched")
        same_gpu = cfg.aug_device == "cuda" and device.type == "cuda"  # no index: this process's own GPU
        return impl, device if same_gpu else torch.device(cfg.aug_device)

    def _choose_workers(self) -> int:
        """Auto: no loader processes on a CPU whose batched views come from cached images (workers
        would only take cores from the training step), else one per core up to 4 to decode."""
        if self.cfg.workers is not None:
            return self.cfg.workers
        inline = self.rt.device.type == "cpu" and self.aug_impl == "batched" and self.dataset.cache is not None
        return 0 if inline else DEFAULT_WORKERS

    def _resume_path(self) -> Path | None:
        """``--resume FILE``; else the run folder's own checkpoint, unless ``--restart`` sets it aside."""
        if self.cfg.resume:
            return Path(self.cfg.resume)
        auto = self.run_dir / CHECKPOINT_NAME
        if self.cfg.restart:
            if self.rt.main:
                aside = set_aside(self.run_dir, [CHECKPOINT_NAME, METRICS_NAME, STEPS_NAME, BACKBONE_DIR,
                                                 CURVES_NAME, TENSORBOARD_DIR])
                if aside:
                    tqdm.write(f"--restart: the earlier run's files are kept in {aside}")
            self.rt.barrier()
            return None
        return auto if auto.exists() else None

    @property
    def global_step(self) -> int:
        """Optimisation steps done so far, over all epochs."""
        return self.epoch * self.steps_per_epoch + self.step_in_epoch

    # -- checkpoints -------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        """The official layout of the run's generation (v3 adds ``scaler``), plus mocohub's extras."""
        official = {"epoch": self.epoch, "arch": self.cfg.arch, "state_dict": _moco_state_dict(self.model),
                    "optimizer": self.optimizer.state_dict()}
        if self.algo.v3:
            official["scaler"] = self.scaler.state_dict()
        return {
            **official,
            "mocohub": {"config": self.cfg.as_dict(), "data": self.data_id, "scaler": self.scaler.state_dict(),
                        "rng": rng_state(), "step_in_epoch": self.step_in_epoch, "world_size": self.rt.world},
        }

    def _save(self) -> None:
        if self.rt.main:
            save_checkpoint(self._state(), self.run_dir / CHECKPOINT_NAME)

    def _check_resume(self, path: Path, extra: dict[str, Any]) -> None:
        """Refuse a resume that would continue a different experiment; report allowed changes."""
        saved = {**extra.get("config", {}), "world_size": extra.get("world_size")}
        current = {**self.cfg.as_dict(), "world_size": self.rt.world}
        if "data" in extra:
            saved["data_images"], current["data_images"] = extra["data"], self.data_id
        refused, changed = config_differences(saved, current)
        if refused:
            raise MocohubError(f"{path} was trained with other settings, so resuming it would continue a different "
                               "experiment:\n  " + "\n  ".join(refused) + f"\nRun with the old settings, train into "
                               "another --out (or leave --out unset for a fresh folder), or pass --restart to start "
                               "this folder over (its files are kept aside)")
        if changed and self.rt.main:
            tqdm.write("resuming with changed settings: " + "; ".join(changed))

    def _load(self, path: Path) -> None:
        try:
            state = load_checkpoint(path, generation="v3" if self.algo.v3 else "v1/v2")
        except MocohubError as e:
            hint = "" if self.cfg.resume else (" (pass --restart to start this run folder over; the file is "
                                                "kept aside, not deleted)")
            raise MocohubError(f"{e}{hint}") from e
        extra = state.get("mocohub")
        if extra:
            self._check_resume(path, extra)
        sd = {k.removeprefix("module."): v for k, v in state["state_dict"].items()}
        try:
            self.model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            shape = (f"mlp-dim {self.cfg.mlp_dim}" if self.algo.v3 else f"K {self.cfg.moco_k}, mlp {self.cfg.mlp}")
            raise MocohubError(f"{path} does not fit this run ({self.cfg.arch}, dim {self.cfg.moco_dim}, "
                               f"{shape}): {str(e).splitlines()[0]} ... pass the flags it was trained with") from e
        self.optimizer.load_state_dict(fit_optimizer_state(state["optimizer"], self.model, self.optimizer))
        for group in self.optimizer.param_groups:  # this run's flags, not the file's, drive the update
            group.update(self.algo.hyper)
        self.epoch = int(state["epoch"])
        scaler = (extra or {}).get("scaler") or state.get("scaler")
        if self.scaler.is_enabled() and scaler:
            self.scaler.load_state_dict(scaler)
        if extra:  # a mocohub checkpoint: continue to the step
            set_rng_state(extra["rng"])
            self.step_in_epoch = int(extra["step_in_epoch"])
        done = self.global_step
        # The lr is a function of --lr and the position (as in the official code), so a resumed run
        # may lower --lr; an official checkpoint's epoch is the next one to run.
        self.scheduler.base_lrs = [self.algo.peak_lr] * len(self.optimizer.param_groups)
        self.scheduler.last_epoch = done
        for group, factor in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group["lr"] = self.algo.peak_lr * factor(done)
        if self.rt.main:
            self.log.trim(done, self.epoch)
            tqdm.write(f"resumed from {path} at epoch {self.epoch}, step {self.step_in_epoch}")

    # -- the loop ------------------------------------------------------------------------------
    def _loader(self, dataset, sampler, batch_size: int, drop_last: bool) -> DataLoader:
        """A loader whose randomness comes from its own generator, never the global one."""
        generator = torch.Generator().manual_seed(self.cfg.seed + self.epoch)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.workers,
                          collate_fn=collate_images, pin_memory=self.rt.device.type == "cuda",
                          drop_last=drop_last, generator=generator, worker_init_fn=_leave_signals_to_the_trainer)

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return images.to(self.rt.device, non_blocking=True, memory_format=fmt)

    def _train_step(self, im_q: torch.Tensor, im_k: torch.Tensor, m: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step of either generation; ``m`` is v3's momentum for it (v1/v2: None)."""
        with autocast(self.rt.device, self.precision):
            loss, logits, labels = self.algo.forward(self.net, self._to_device(im_q), self._to_device(im_k), m)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        correct = (logits.argmax(dim=1) == labels).float().mean()
        return loss.detach(), correct.detach()

    def _diverged(self, loss: float | str, step: int) -> MocohubError:
        return MocohubError(
            f"the loss became {loss} at step {step} (epoch {self.epoch}); the run stopped without "
            f"saving, so {self.run_dir / CHECKPOINT_NAME} still holds the last good state. "
            "Lower --lr or train with --precision fp32", exit_code=3)

    def _agree_to_stop(self, loss: torch.Tensor, step: int) -> bool:
        """Whether every process stops after this step. A signal may reach one rank only and a loss
        may diverge on one rank only: with several processes one all-reduce per step shares both,
        so all ranks stop (or fail) at the same step instead of hanging in different collectives."""
        if self.rt.world > 1:
            signalled, diverged = self.rt.any(self._stop_signal is not None, ~torch.isfinite(loss))
            if diverged:
                raise self._diverged("non-finite on at least one process", step)
            self.interrupted = self.interrupted or signalled
        else:  # one process: the signal flag is local, and the loss is checked where it is synced anyway
            self.interrupted = self._stop_signal is not None
        return self.interrupted or (self.cfg.max_steps is not None and self.global_step >= self.cfg.max_steps)

    def _flush(self, pending: list[tuple[int, dict[str, float], torch.Tensor, torch.Tensor]]) -> list[list[float]]:
        """Move the buffered [loss, accuracy] pairs to the host (the only sync), check, log them."""
        if not pending:
            return []
        values = torch.stack([torch.stack([loss, acc]) for _, _, loss, acc in pending]).cpu().tolist()
        for (step, _, _, _), (loss, _) in zip(pending, values):
            if not math.isfinite(loss):
                raise self._diverged(loss, step)
        if self.rt.main:  # one line per interval: its last step, mean loss and accuracy, lr
            losses, accs = zip(*values)
            self.log.log_steps({"step": pending[-1][0], "epoch": self.epoch, "steps": len(values),
                                "loss": statistics.fmean(losses), "acc1": 100 * statistics.fmean(accs),
                                **pending[-1][1]})
        pending.clear()
        return values

    def _train_epoch(self) -> dict[str, Any]:
        cfg = self.cfg
        self.net.train()
        self.dataset.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch, start_step=self.step_in_epoch)
        loader = self._loader(self.dataset, self.sampler, self.per_rank, drop_last=True)
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {self.epoch}",
                   disable=not (self.rt.main and cfg.progress), dynamic_ncols=True, unit="step")
        pending, logged, failed, images, t0 = [], [], 0, 0, time.perf_counter()
        epoch_lr = self.optimizer.param_groups[0]["lr"]
        for batch in loader:
            global_step = self.global_step
            lr = self.optimizer.param_groups[0]["lr"]
            m = self.algo.momentum(global_step)
            views = self.views.augment(batch.images, self.aug_device) if self.views else batch.images
            loss, acc = self._train_step(*views, m)
            pending.append((global_step, {"lr": lr} if m is None else {"lr": lr, "moco_m": m}, loss, acc))
            failed += self._note_failed(batch.failed)
            images += self.per_rank * self.rt.world
            self.step_in_epoch += 1
            stop = self._agree_to_stop(loss, global_step)
            bar.update(1)
            if len(pending) >= cfg.log_every or self.step_in_epoch == self.steps_per_epoch:
                logged += self._flush(pending)
                bar.set_postfix(loss=f"{logged[-1][0]:.4f}", lr=f"{lr:.4g}",
                                img_s=f"{images / (time.perf_counter() - t0):.0f}")
            if stop:
                break
        logged += self._flush(pending)
        bar.close()
        elapsed, n = time.perf_counter() - t0, max(1, len(logged))
        return {"epoch": self.epoch, "loss": sum(v[0] for v in logged) / n,
                "acc1": 100 * sum(v[1] for v in logged) / n,
                "lr": epoch_lr, "images_per_s": images / max(elapsed, 1e-9),
                "seconds": elapsed, "skipped": len(self.dataset.skipped) + int(self.rt.sum(failed))}

    def _note_failed(self, paths: list[str]) -> int:
        for path in paths:
            if path not in self.failed_seen:
                self.failed_seen.add(path)
                warnings.warn(f"skipped an image that could not be decoded: {path}", stacklevel=2)
        return len(paths)

    def _knn_datasets(self) -> tuple[ImageFolder, ImageFolder]:
        """The kNN monitor's bank (the training images) and queries, checked before training starts."""
        cfg = self.cfg
        transform = transform_for(self.eval_cfg)
        with warnings.catch_warnings():  # the training set already reported its non-image files
            warnings.simplefilter("ignore")
            bank = ImageFolder(cfg.data, transform, on_error="skip")
        val = ImageFolder(cfg.val, transform, on_error="skip")
        if not bank.classes:
            raise MocohubError(f"--val needs labelled training images for the kNN bank: put {cfg.data}'s "
                               "images in class sub-folders, or drop --val")
        if bank.classes != val.classes:
            raise MocohubError(f"--val {cfg.val} has classes {val.classes[:5]}..., the training folder "
                               f"{bank.classes[:5]}...: the kNN monitor needs the same class sub-folders")
        return bank, val

    def _knn(self) -> dict[str, float]:
        """Every rank embeds its share (see ``sharded_knn``), so no rank idles in a collective."""
        cfg, bank = self.cfg, self.knn_sets[0]
        batch = max(self.per_rank, 256)
        return sharded_knn(self.rt, self.algo.query_encoder, *self.knn_sets,
                           lambda ds: self._loader(ds, None, batch, drop_last=False), len(bank.classes),
                           dim=cfg.moco_dim, k=cfg.knn_k, t=cfg.knn_t, precision=self.precision,
                           channels_last=self.channels_last)

    def _export(self, metrics: dict[str, Any]) -> Path:
        cfg = self.cfg
        state = self.model.backbone_state_dict()
        meta = {"moco_version": cfg.moco_version, "recipe": cfg.recipe, "epochs": self.epoch,
                "source": "mocohub train", "dataset": Path(cfg.data).name, **metrics}
        if self.algo.v3:  # a timm ViT (MoCo v3's names mapped, img/patch size as trained) or a ResNet
            built = self.model.backbone_config()
            pretrained_cfg = self.eval_cfg if self.model.projector_name == "fc" else \
                dict(self.eval_cfg, first_conv="patch_embed.proj", classifier="head")
            config = build_config(built["architecture"], num_features=built["num_features"], stem=built["stem"],
                                  pretrained_cfg=pretrained_cfg, meta=meta)
            config["model_args"] = built["model_args"]
        else:
            config = build_config(cfg.arch, num_features=self.model.encoder_q.num_features, stem=cfg.stem,
                                  pretrained_cfg=self.eval_cfg, meta=meta)
        return write_pretrained(self.run_dir / BACKBONE_DIR, state, config)

    def _epoch_line(self, row: dict[str, Any]) -> str:
        knn = f", kNN top-1 {pct(row['knn_top1'])}" if "knn_top1" in row else ""
        skipped = f", {row['skipped']} file(s) skipped" if row["skipped"] else ""
        return (f"epoch {row['epoch'] + 1}/{self.cfg.epochs}: loss {row['loss']:.3f}, instance accuracy "
                f"{pct(row['acc1'])}{knn}, {row['images_per_s']:.0f} img/s, {duration(row['seconds'])}{skipped}")

    def _announce(self) -> None:
        cfg = self.cfg
        layout = "channels-last" if self.channels_last else "NCHW"
        if self.algo.v3:
            m = f"m {cfg.moco_m}{' rising to 1 (m-cos)' if cfg.moco_m_cos else ''}"
            what = (f"MoCo v3, {cfg.recipe} recipe ({cfg.optimizer}, lr {self.algo.peak_lr:g} after "
                    f"{cfg.warmup_epochs} warmup epochs, T {cfg.moco_t}, {m})")
            synced = self.rt.world > 1 and self.rt.device.type == "cuda"
            tail = f"{'SyncBatchNorm' if synced else 'BN'} over each process's batch"
        else:
            head = "MLP" if cfg.mlp else "linear"
            sym = ", symmetric" if cfg.symmetric else ""
            what = f"MoCo, {cfg.recipe} recipe ({head} head, T {cfg.moco_t}{sym})"
            shuffle = "" if cfg.shuffle_bn else " without Shuffle BN (the ablation)"
            tail = f"K {cfg.moco_k}, BN in {self.bn_splits} group(s) per process{shuffle}"
        tqdm.write(f"{what}: {cfg.arch} on {len(self.dataset)} images of {cfg.data}, "
                   f"{cfg.image_size} px, batch {cfg.batch_size} over {self.rt.world} process(es) on "
                   f"{self.rt.device.type}, {self.steps_per_epoch} steps/epoch, {tail} -> {self.run_dir}")
        tqdm.write(f"precision {self.precision} ({self.precision_why}), {layout}")

    def fit(self) -> Path:
        """Train to ``cfg.epochs`` (or ``max_steps``), checkpointing each epoch; export the backbone."""
        cfg, metrics = self.cfg, {}
        if self.rt.main:
            self._announce()
        handles_signals = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if handles_signals else {}
        try:
            while self.epoch < cfg.epochs and not self.interrupted and not (
                    cfg.max_steps is not None and self.global_step >= cfg.max_steps):
                row = self._train_epoch()
                if self.step_in_epoch < self.steps_per_epoch:  # stopped inside the epoch
                    self._save()
                    break
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                if cfg.val and (self.epoch % cfg.knn_every == 0 or self.epoch == cfg.epochs):
                    metrics = self._knn()
                    row.update(metrics)
                if self.rt.main:
                    self.log.log_epoch(row)
                    tqdm.write(self._epoch_line(row))
                # The row first, then the checkpoint: a kill between them resumes from the previous
                # checkpoint, which trims the row and writes it again; the other order lost it.
                self._save()
            self.rt.barrier()  # rank 0's checkpoint is on disk before any process leaves
            if self.interrupted:
                raise KeyboardInterrupt
            out = self._export(metrics) if self.rt.main else self.run_dir / BACKBONE_DIR
            self.rt.barrier()
            return out
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.close()

    def close(self) -> None:
        """Release the run folder and the process group (also after a failed start)."""
        if self.log is not None:
            self.log.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        self.rt.close()

    def _on_signal(self, signum: int, frame) -> None:
        """Finish the current step, checkpoint, then stop (a second signal stops at once)."""
        if self._stop_signal is not None:
            raise KeyboardInterrupt
        self._stop_signal = signum


def train(cfg: TrainConfig) -> Path:
    """Run MoCo (v1, v2 or v3) pre-training as ``cfg`` says; return the exported backbone folder."""
    return Trainer(cfg).fit()
