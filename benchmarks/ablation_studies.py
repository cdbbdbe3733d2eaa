"""The ablation studies and their sizes, as data: what each study varies, what the paper claims,
and at what scale it runs. Whether a setting can run is the package's own check (``validate``)."""
from __future__ import annotations

from dataclasses import dataclass

from mocohub.cli.main import build_parser
from mocohub.cli.train import config_from_args
from mocohub.errors import MocohubError
from mocohub.training.config import TrainConfig
from mocohub.training.validate import validate

__all__ = ["Size", "Setting", "Study", "SIZES", "PUBLIC_SIZES", "STUDIES", "flag_list", "train_config", "plan"]

Flags = dict[str, str]


@dataclass(frozen=True)
class Size:
    """One scale of every study. lr: the ``cifar`` recipe's 0.06 at batch 512, scaled linearly with the
    batch. sweeps: the values a sweeping study runs (the queue study: --moco-k). train/val_per_class: the
    first N file names per class (None: all). workers: loader processes per run (None: mocohub's choice)."""

    train_per_class: int | None
    val_per_class: int | None
    image_size: int
    arch: str
    epochs: int
    batch: int
    lr: float
    moco_k: int
    knn_k: int
    sweeps: dict[str, tuple[int, ...]]
    workers: int | None = None

    def base_flags(self, epochs: int | None = None) -> Flags:
        """The `mocohub train` flags every run of this size shares (``epochs``: instead of the size's)."""
        flags = {"--recipe": "cifar", "--arch": self.arch, "--stem": "cifar", "--image-size": str(self.image_size),
                 "--epochs": str(epochs or self.epochs), "--batch-size": str(self.batch), "--lr": str(self.lr),
                 "--moco-k": str(self.moco_k), "--knn-k": str(self.knn_k), "--knn-every": "1"}
        return flags if self.workers is None else {**flags, "--workers": str(self.workers)}


SIZES: dict[str, Size] = {
    # about 15 minutes a study on 2 AMX cores (bf16; twice that in fp32 on an AVX2-only CPU): 5,000 images, 200
    # steps of 256, about 2 minutes a run. Sized by time alone, before any result was seen.
    "cpu": Size(500, 100, 32, "test_resnet", epochs=10, batch=256, lr=0.03, moco_k=4096, knn_k=200,
                sweeps={"--moco-k": (256, 1024, 4096)}),
    # the official CIFAR-10 demo (recipe `cifar`): 50,000 + 10,000 images, ResNet-18 (3x3 stem), 200 epochs,
    # batch 512, lr 0.06, K 4096; 256 is no multiple of 512, 65536 exceeds the 50,000 images
    "full": Size(None, None, 32, "resnet18", epochs=200, batch=512, lr=0.06, moco_k=4096, knn_k=200,
                 sweeps={"--moco-k": (1024, 4096, 16384)}),
    # hidden (tests/test_ablations.py, gpu_check.sh --dry-run): seconds per run, nothing learnt
    "smoke": Size(8, 2, 8, "test_resnet", epochs=2, batch=8, lr=0.03, moco_k=16, knn_k=10,
                  sweeps={"--moco-k": (8, 16)}, workers=0),
}
PUBLIC_SIZES = ("cpu", "full")


@dataclass(frozen=True)
class Setting:
    name: str
    flags: Flags


@dataclass(frozen=True)
class Study:
    """``settings``: flags on top of the size's base flags. ``sweep``: (flag, name prefix), one setting
    per value the size lists for that flag."""

    name: str
    claim: str  # what the paper says, next to which the result is read
    settings: tuple[Setting, ...] = ()
    sweep: tuple[str, str] | None = None

    def settings_for(self, size: Size) -> list[Setting]:
        if self.sweep is None:
            return list(self.settings)
        flag, prefix = self.sweep
        return [*self.settings, *(Setting(f"{prefix}{v}", {flag: str(v)}) for v in size.sweeps[flag])]


_V1 = {"--mlp": "false", "--moco-t": "0.07", "--aug": "moco-v1"}
STUDIES: dict[str, Study] = {s.name: s for s in (
    Study("momentum", "He et al. 2020 (momentum ablation, ImageNet linear accuracy): m = 0 fails to train (the loss "
                      "oscillates), 0.9 is much worse, 0.99 to 0.9999 work, 0.999 is best",
          tuple(Setting(f"m{m}", {"--moco-m": m}) for m in ("0", "0.9", "0.99", "0.999"))),
    # 8 BN statistic groups, as the official 8 GPUs (each normalising its own 32 images); on one device the
    # trainer splits the batch into 8 SplitBatchNorm groups (fewer if a group would drop below 32: noted)
    Study("shuffle-bn", "He et al. 2020 (Shuffling BN, and its appendix): without Shuffle BN the pretext accuracy "
                        "climbs fast (the model cheats through the BN statistics of its sub-batch) while the "
                        "representation (kNN, linear) gets worse",
          (Setting("shuffle-bn", {"--shuffle-bn": "true", "--bn-groups": "8"}),
           Setting("no-shuffle-bn", {"--shuffle-bn": "false", "--bn-groups": "8"}))),
    Study("queue", "He et al. 2020 (the comparison of contrastive loss mechanisms over K): a larger queue K gives "
                   "better features, independent of the batch size", sweep=("--moco-k", "k")),
    # The v1/v2 augmentations at 32 px: RandomResizedCrop(32, scale 0.2-1), jitter, grayscale, flip and, for v2, a
    # Gaussian blur of sigma 0.1-2.0 *pixels* (p 0.5). Made for 224-px crops, that blur is about 7x stronger
    # relative to a 32-px image and wipes out much of a CIFAR image; run as the paper's setting all the same.
    Study("v1-v2", "Chen et al. 2020 (MoCo v2's ablation): the MLP head, T 0.2 and the stronger augmentation each "
                   "improve on v1 (the released 200-epoch ResNet-50s: v1 60.6, v2 67.7 ImageNet linear top-1)",
          (Setting("v1", _V1), Setting("v1+mlp", {**_V1, "--mlp": "true"}),
           Setting("v1+mlp+t0.2", {**_V1, "--mlp": "true", "--moco-t": "0.2"}),
           Setting("v2", {"--mlp": "true", "--moco-t": "0.2", "--aug": "moco-v2"}))),
    Study("symmetric", "the official CIFAR-10 demo (kNN top-1, 200/400/800 epochs): asymmetric 82.6 / 86.3 / 88.7, "
                       "symmetric 85.3 / 88.5 / 89.7 (the symmetric loss sees each pair twice)",
          (Setting("asymmetric", {"--symmetric": "false"}), Setting("symmetric", {"--symmetric": "true"}))),
)}


def flag_list(flags: Flags) -> list[str]:
    return [x for k, v in flags.items() for x in (k, str(v))]


def train_config(flags: Flags) -> TrainConfig:
    """The TrainConfig `mocohub train DATA <flags>` runs with: its own parser and defaults."""
    return config_from_args(build_parser().parse_args(["train", "DATA", *flag_list(flags)]))


def plan(study: Study, size: Size, base: Flags, chosen: list[str] | None = None) -> tuple[list[Setting], list[str]]:
    """The settings to run (``chosen``: only these) and notes: a setting the package refuses is dropped
    with its reason; a BN group count the trainer lowers (groups of at least 32 images) is said."""
    settings = study.settings_for(size)
    if chosen:
        unknown = [c for c in chosen if c not in {s.name for s in settings}]
        if unknown:
            raise MocohubError(f"{study.name}: no setting {', '.join(unknown)}; its settings: "
                               f"{', '.join(s.name for s in settings)}")
        settings = [s for s in settings if s.name in chosen]
    kept, notes = [], []
    for setting in settings:
        try:
            groups = validate(train_config({**base, **setting.flags}), world=1)
        except MocohubError as e:
            notes.append(f"{setting.name} dropped: {e}")
            continue
        kept.append(setting)
        wanted = setting.flags.get("--bn-groups")
        if wanted and groups != int(wanted):
            notes.append(f"{setting.name}: {groups} BN group(s) of {size.batch // groups} images, not {wanted} (the "
                         "trainer keeps groups of at least 32 images; 1 group: the shuffle changes nothing)")
    if not kept:
        raise MocohubError(f"{study.name}: no setting can run at this size ({'; '.join(notes)}): edit SIZES")
    return kept, notes
