"""The input side of a run: the images, how their two views are made and where, the loaders, and the
kNN monitor's labelled sets. Every choice is made once, at start, and recorded (``record.py``)."""
from __future__ import annotations

import gc
import signal
import warnings
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.augment import AUGMENTATIONS, two_views
from ..data.batched import BatchedTwoViews
from ..data.folder import DEFAULT_WORKERS, Batch, ImageFolder, collate_images
from ..data.sources import open_images
from ..errors import MocohubError
from ..zoo.pretrained import pretrained_cfg_for
from ..zoo.transforms import transform_for
from .config import TrainConfig
from .data_checks import check_data, knn_classes_refusal
from .resume import data_fingerprint

__all__ = ["InputPipeline", "choose_augmentation"]


def _start_worker(worker_id: int) -> None:
    """Ctrl-C and SIGTERM reach a whole process group; loader workers ignore them so the trainer
    can finish its step, checkpoint and shut them down (instead of dying under it mid-step).
    ``gc.freeze()``: the objects a forked worker inherits are never visited by its collector, whose
    first full pass would otherwise copy every page they sit on (benchmarks/README: start-up)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    gc.freeze()


def choose_augmentation(cfg: TrainConfig, device: torch.device) -> tuple[str, torch.device]:
    """Batched tensor ops (crops in the loader, the photometric ops on the returned device) or PIL per
    image in the loader workers. Auto is batched everywhere: a GPU outruns the PIL workers, and
    on 2 CPU cores a run trained x1.6 (fp32, AVX2) to x1.9 (bf16, AMX) faster (benchmarks/README)."""
    impl = "batched" if cfg.aug_impl == "auto" else cfg.aug_impl
    if cfg.aug_device in (None, "auto"):
        return impl, device
    if cfg.aug_device.startswith("cuda") and not torch.cuda.is_available():
        raise MocohubError(f"--aug-device {cfg.aug_device}: no CUDA GPU is visible here; use --aug-device cpu "
                           "or auto")
    if impl != "batched":
        raise MocohubError("--aug-device applies to the batched augmentation: add --aug-impl batched")
    same_gpu = cfg.aug_device == "cuda" and device.type == "cuda"  # no index: this process's own GPU
    return impl, device if same_gpu else torch.device(cfg.aug_device)


class InputPipeline:
    """The training images and their views, checked before anything is written."""

    def __init__(self, cfg: TrainConfig, device: torch.device, channels_last: bool, per_rank: int,
                 barrier: Callable[[], None] | None = None):
        """``barrier``: every process of the run enters it together (one image cache per node)."""
        self.cfg, self.device, self.channels_last = cfg, device, channels_last
        self.aug_impl, self.aug_device = choose_augmentation(cfg, device)
        batched = self.aug_impl == "batched"
        views = (BatchedTwoViews if batched else two_views)(cfg.aug, cfg.image_size, crop_min=cfg.crop_min)
        self.views = views if batched else None  # the batch half of the batched views
        self.dataset = open_images(cfg.data, views, seed=cfg.seed, cache_images=cfg.cache_images,
                                   cache_barrier=barrier)
        self.checks = check_data(cfg, len(self.dataset))  # the settings against the data (data_checks.py)
        if self.checks.refusal:
            raise MocohubError(self.checks.refusal)
        if device.type == "cpu" and per_rank * cfg.image_size ** 2 > 64 * 224 ** 2:
            warnings.warn(f"training on the CPU with {per_rank} images of {cfg.image_size} px per step needs "
                          "tens of GB of memory and hours per epoch; for a first CPU run use --recipe cifar "
                          "or cifar-v3, or a smaller --batch-size (v1/v2: and --moco-k a multiple of it)", stacklevel=4)
        for warning in self.checks.warnings:
            warnings.warn(warning, stacklevel=4)
        self.workers = self._choose_workers()
        # relative names: a moved folder, or the shards written from it, fingerprint the same
        self.fingerprint = data_fingerprint(self.dataset.root, (p for p, _ in self.dataset.samples))
        # evaluation preprocessing: the recipe's normalisation at the training crop size
        self.eval_cfg = pretrained_cfg_for(cfg.image_size, *AUGMENTATIONS[cfg.aug][2])
        self.knn_sets = self._knn_datasets() if cfg.val else None
        # the kNN monitor's embedding batch (the budget's probe times the same): --micro-batch is what fits
        self.knn_batch = cfg.micro_batch or max(per_rank, 256)

    def _choose_workers(self) -> int:
        """Auto: no loader processes on a CPU whose batched views come from cached images (workers
        would only take cores from the training step), else one per core up to 4 to decode."""
        if self.cfg.workers is not None:
            return self.cfg.workers
        inline = self.device.type == "cpu" and self.aug_impl == "batched" and self.dataset.cache is not None
        return 0 if inline else DEFAULT_WORKERS

    def _knn_datasets(self) -> tuple[ImageFolder, ImageFolder]:
        """The kNN monitor's bank (the training images) and queries, checked before training starts."""
        cfg = self.cfg
        transform = transform_for(self.eval_cfg)
        with warnings.catch_warnings():  # the training set already reported its non-image files
            warnings.simplefilter("ignore")
            bank = open_images(cfg.data, transform, on_error="skip")
        val = open_images(cfg.val, transform, on_error="skip")
        refusal = knn_classes_refusal(cfg.val, bank.classes, val.classes, cfg.data)
        if refusal:
            raise MocohubError(refusal)
        return bank, val

    def loader(self, dataset: Dataset, sampler: Sampler | None, batch_size: int, *, epoch: int,
               drop_last: bool) -> DataLoader:
        """A loader whose randomness comes from its own generator, never the global one."""
        generator = torch.Generator().manual_seed(self.cfg.seed + epoch)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.workers,
                          collate_fn=collate_images, pin_memory=self.device.type == "cuda",
                          drop_last=drop_last, generator=generator, worker_init_fn=_start_worker)

    def epoch(self, sampler: Sampler, batch_size: int, epoch: int) -> Iterator[Batch]:
        """The epoch's batches (from the sampler's position: a resumed epoch skips what was done)."""
        self.dataset.set_epoch(epoch)
        return iter(self.loader(self.dataset, sampler, batch_size, epoch=epoch, drop_last=True))

    def two_views(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's query and key views on the training device, in its memory format (one
        conversion: the batched views are made in that format where they are made)."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.views is not None:
            views = self.views.augment(batch.images, self.aug_device, channels_last=self.channels_last)
        else:
            views = batch.images
        return tuple(v.to(self.device, non_blocking=True, memory_format=fmt) for v in views)
