"""``mocohub train DATA_DIR``: MoCo v1/v2/v3 pre-training with every official hyper-parameter as a flag."""
from __future__ import annotations

import argparse
import contextlib
import sys

from dataclasses import fields

from ..data.defaults import DEFAULT_WORKERS
from ..jsonlog import read_jsonl
from ..run_folder import RunFolder
from ..errors import MocohubError
from ..training.choices import CHOICES
from ..training.config import TrainConfig
from ..training.durations import parse_duration
from ..training.recipes import RECIPES
from .output import add_json_flag, emit

__all__ = ["add_parser", "config_from_args", "run"]


DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}  # the run's own settings: one source


def _recipe_default(field: str) -> str:
    values = {name: getattr(r, field) for name, r in RECIPES.items()}
    shown = [f"{n}: {' '.join(map(str, v)) if isinstance(v, tuple) else v}" for n, v in values.items()]
    return NOTES.get(field, "") + "default from --recipe (" + "; ".join(shown) + ")"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except for switches and the recipe-dependent flags (their help lists them);
    the description and the recipe examples keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except MocohubError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--time-budget {text!r}: ")) from e


# flag -> (recipe field, type, extra argparse options)
RECIPE_FLAGS = {
    "--arch": ("arch", str, {"metavar": "ARCH"}),
    "--stem": ("stem", str, {"choices": CHOICES["stem"]}),
    "--epochs": ("epochs", int, {}),
    "--batch-size": ("batch_size", int, {"metavar": "N"}),
    "--lr": ("lr", float, {}),
    "--schedule": ("schedule", str, {"choices": CHOICES["schedule"]}),
    "--lr-steps": ("lr_steps", int, {"nargs": "+", "metavar": "EPOCH"}),
    "--momentum": ("momentum", float, {}),
    "--wd": ("weight_decay", float, {}),
    "--moco-dim": ("moco_dim", int, {}),
    "--moco-k": ("moco_k", int, {}),
    "--moco-m": ("moco_m", float, {}),
    "--moco-t": ("moco_t", float, {}),
    "--mlp": ("mlp", _bool, {"metavar": "BOOL"}),
    "--symmetric": ("symmetric", _bool, {"metavar": "BOOL"}),
    "--shuffle-bn": ("shuffle_bn", _bool, {"metavar": "BOOL"}),
    "--aug": ("aug", str, {"choices": CHOICES["aug"]}),
    "--image-size": ("image_size", int, {}),
    "--crop-min": ("crop_min", float, {"metavar": "SCALE"}),
    "--bn-groups": ("bn_groups", int, {}),
    "--optimizer": ("optimizer", str, {"choices": CHOICES["optimizer"]}),
    "--warmup-epochs": ("warmup_epochs", int, {}),
    "--moco-m-cos": ("moco_m_cos", _bool, {"metavar": "BOOL"}),
    "--mlp-dim": ("mlp_dim", int, {}),
    "--stop-grad-conv1": ("stop_grad_conv1", _bool, {"metavar": "BOOL"}),
    "--patch-size": ("patch_size", int, {}),
}
# what a flag means where the generations differ, ahead of its recipe defaults
NOTES = {
    "arch": "v1/v2: a ResNet; v3: a ResNet, vit_small, vit_base or a timm vit_* name (e.g. test_vit); ",
    "lr": "v1/v2: the lr of --batch-size (unset: the recipe's, scaled linearly to --batch-size); v3: the base lr "
          "for 256 images, used x batch/256 (main_moco.py); ",
    "schedule": "v1/v2 (v3: warmup, then a per-iteration half-cosine); ",
    "moco_k": "v1/v2 queue size (v3 has no queue: 0); ",
    "moco_m": "v3 with --moco-m-cos: the starting value; ",
    "mlp": "v1/v2 head; ",
    "symmetric": "v1/v2: also contrast the swapped views, --moco-k a multiple of 2x batch (v3: always); ",
    "shuffle_bn": "v1/v2: compute the keys on a shuffled batch; false is the paper's ablation, which lets the "
                  "model cheat through BN statistics (v3 has no shuffle: keep it true); ",
    "bn_groups": "v1/v2 Shuffle-BN groups (v3: BN over each process's batch, SyncBN over GPUs); ",
    "optimizer": "v1/v2: sgd; v3: lars or adamw; ",
    "warmup_epochs": "v3: linear lr warmup; ",
    "moco_m_cos": "v3: m rises to 1 along a half-cosine; ",
    "mlp_dim": "v3: hidden width of projector and predictor; ",
    "stop_grad_conv1": "v3 ViT: freeze the random patch projection; ",
    "patch_size": "v3 ViT: patch size, for small images (none: the architecture's own); ",
}
EPILOG = """MoCo v3's released ResNet-50 models (main_moco.py --moco-m-cos --crop-min=.2):
  100 epochs:  --recipe moco-v3
  300 epochs:  --recipe moco-v3 --epochs 300 --lr 0.3
  1000 epochs: --recipe moco-v3 --epochs 1000 --lr 0.3 --wd 1.5e-6 --moco-m 0.996
ViT-Small, 300 epochs: --recipe moco-v3-vit; ViT-Base: --recipe moco-v3-vit --arch vit_base.
A tiny ViT for a CPU try: --recipe moco-v3-vit --arch test_vit --image-size 32 --patch-size 8."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pre-train MoCo on a folder of images",
                       description="Pre-train MoCo v1/v2/v3 on any folder of images (class sub-folders optional).\n"
                                   "Under torchrun every process runs this command; --batch-size is global.",
                       epilog=EPILOG, formatter_class=_HelpFormatter)
    p.add_argument("data", metavar="DATA_DIR", help="folder of images (searched recursively), or WebDataset "
                   "shards: a .tar file or a brace pattern such as '/data/train-{000000..000127}.tar' (quote it)")
    p.add_argument("--recipe", default=DEFAULTS["recipe"], choices=CHOICES["recipe"],
                   help="the paper setting to start from")
    p.add_argument("--out", default=None, metavar="RUN_DIR",
                   help="checkpoints, metrics and the exported backbone go here; an existing run folder resumes "
                        "(if its settings match). Default: a fresh runs/<recipe>-<arch>-<time>")
    hp = p.add_argument_group("hyper-parameters (each defaults to the recipe's value)")
    for flag, (field, kind, extra) in RECIPE_FLAGS.items():
        hp.add_argument(flag, dest=field, type=kind, default=None, help=_recipe_default(field), **extra)
    hp.add_argument("--bn-splits", type=int, default=None,
                    help="BN sub-batches per process (Shuffle BN on one device); default: bn-groups / processes, "
                         "fewer if groups would drop below 32 images")
    hp.add_argument("--micro-batch", type=int, default=None, metavar="N",
                    help="compute each process's share of --batch-size in chunks of N images (activation memory "
                         "follows N; --batch-size keeps its meaning): v1/v2 accumulate the chunks' gradients, v3 "
                         "caches the features' gradient over the whole batch (one more backbone forward per step). "
                         "BatchNorm backbones normalise per chunk (v1/v2: --bn-splits within it), as each GPU does "
                         "without SyncBN; a ViT gets exactly the whole batch's gradient")
    hp.add_argument("--allow-large-queue", action="store_true",
                    help="v1/v2: train with a --moco-k larger than the number of training images (refused "
                         "otherwise: queries would meet their own image among the negatives)")
    hp.add_argument("--lr-per-iteration", action="store_true",
                    help="v1/v2: update the schedule every step instead of every epoch (v3 always does, as its "
                         "official code)")
    hw = p.add_argument_group("hardware")
    hw.add_argument("--precision", default=DEFAULTS["precision"], choices=CHOICES["precision"],
                    help="autocast precision; auto: bf16 where the hardware computes it natively "
                         "(AMX or AVX512-BF16 CPUs, GPUs of compute capability 8.0 or more), fp16 with a "
                         "GradScaler on older GPUs, else fp32")
    hw.add_argument("--channels-last", type=_bool, default=None, metavar="BOOL",
                    help="NHWC memory format; default: on with bf16/fp16, off in fp32")
    hw.add_argument("--workers", type=int, default=None,
                    help="data-loading processes per training process; default: none on a CPU that augments cached "
                         f"images in batches (the cores train instead), else {DEFAULT_WORKERS}")
    hw.add_argument("--aug-impl", default=DEFAULTS["aug_impl"], choices=CHOICES["aug_impl"],
                    help="augmentation: batched tensor ops (auto) or PIL per image in the workers (the reference)")
    hw.add_argument("--aug-device", default=DEFAULTS["aug_device"],
                    help="where batched augmentation runs (cpu, cuda); auto: the training device")
    hw.add_argument("--cache-images", default=DEFAULTS["cache_images"], choices=CHOICES["cache_images"],
                    help="decode the images once and keep them in shared memory; auto: when they fit in a "
                         "quarter of the free memory (at most 2 GiB)")
    hw.add_argument("--compile", action="store_true", help="torch.compile the encoders (needs a C compiler on CPU)")
    hw.add_argument("--device", default=None, help="e.g. cpu or cuda:0; default: the local GPU, else CPU")
    run_g = p.add_argument_group("run")
    run_g.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                       help="seeds initialisation, data order and augmentations")
    run_g.add_argument("--resume", default=None, metavar="CHECKPOINT",
                       help="a mocohub or official MoCo checkpoint of the recipe's generation (v1/v2 or v3); "
                            "RUN_DIR/checkpoint.pth.tar resumes by itself")
    run_g.add_argument("--restart", action="store_true",
                       help="start an existing RUN_DIR over; its earlier files are moved to RUN_DIR/previous-<time>/")
    run_g.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    run_g.add_argument("--time-budget", type=_duration, default=None, metavar="DURATION",
                       help="the run's whole time (90s, 30m, 6h, 1h30m): a short probe times the step and the "
                            "kNN monitor, then the run trains the most epochs that fit, its schedule spanning "
                            "them (instead of --epochs; a resumed run keeps its plan)")
    run_g.add_argument("--val", default=None, metavar="DIR", help="labelled folder or shards for the kNN monitor")
    run_g.add_argument("--knn-every", type=int, default=DEFAULTS["knn_every"], metavar="EPOCHS",
                       help="epochs between kNN scores")
    run_g.add_argument("--knn-k", type=int, default=DEFAULTS["knn_k"], help="neighbours of the weighted kNN")
    run_g.add_argument("--knn-t", type=float, default=DEFAULTS["knn_t"], help="temperature of the weighted kNN")
    run_g.add_argument("--log-every", type=int, default=DEFAULTS["log_every"], metavar="STEPS",
                       help="steps between metric lines (and, under torchrun, stop agreements)")
    run_g.add_argument("--tensorboard", action="store_true",
                       help="also write the logged scalars to RUN_DIR/tensorboard (pip install 'mocohub[tensorboard]')")
    run_g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    add_json_flag(p, "backbone, run_dir, epochs, last_epoch (the last metrics.jsonl row)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's settings: the recipe's values, overridden by every flag given."""
    options = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    if options.get("lr_steps") is not None:
        options["lr_steps"] = tuple(options["lr_steps"])
    return TrainConfig.from_recipe(options.pop("recipe"), **options)


def run(args: argparse.Namespace) -> int:
    from ..training.trainer import train  # torch: imported when a run starts, not for --help

    # under --json the run's own lines go to stderr, so stdout is the one result object
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        out = train(config_from_args(args))
    metrics = read_jsonl(RunFolder(out.parent).metrics)
    emit({"backbone": str(out), "run_dir": str(out.parent), "epochs": len(metrics),
          "last_epoch": metrics[-1] if metrics else None},
         f"backbone saved to {out}; load it with mocohub.from_pretrained({str(out)!r})", args.json)
    return 0
