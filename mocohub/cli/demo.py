"""``mocohub demo``: the whole job end to end on a generated dataset, in a few CPU minutes.

Generate labelled images, pre-train MoCo on them, score kNN top-1 of the trained backbone next
to a randomly initialised one, then load the export back with ``mocohub.from_pretrained``.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

from ..precision_names import PRECISION_CHOICES
from .output import add_json_flag, emit

__all__ = ["add_parser", "run"]

# Epochs that fit well inside 3 minutes on 2 cores: an epoch of the 1,000 images took 4 s on an AVX2-only CPU in fp32
# (about 8 s on the slowest such machine we met, where emulated bf16 is 10x slower still) and 1.5 s in bf16 on an AMX one.
EPOCHS_NATIVE_BF16, EPOCHS_FP32 = 30, 17


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train and evaluate MoCo end to end on a generated dataset",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="mocohub-demo", help="folder for the dataset and the run")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"default: {EPOCHS_NATIVE_BF16} where bf16 is native (AMX CPUs, GPUs), {EPOCHS_FP32} elsewhere, "
                        "so the demo takes about 3 minutes on 2 cores of either kind")
    p.add_argument("--images-per-class", type=int, default=100, help="training images per class (10 classes)")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="auto: bf16 where the hardware has it natively, else fp32")
    p.add_argument("--workers", type=int, default=None, help="loader processes; default: as `mocohub train`")
    add_json_flag(p, "random_init_top1, trained_top1 (kNN top-1 of the backbone features), gain, monitor_knn_top1 "
                     "(the training monitor's, of the query encoder's output), epochs, seconds, backbone, embedding_shape")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .demo_work import demo  # torch: imported when the demo runs

    # under --json the demo's own lines go to stderr, so stdout is the one result object
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result, human = demo(args)
    emit(result, human, args.json)
    return 0
