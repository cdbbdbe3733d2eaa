"""``mocohub plot RUN_DIR [RUN_DIR ...]``: training curves of one run, or several side by side."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..plotting import CURVES_NAME, PLOT_INSTALL, plot_runs
from .output import add_json_flag, emit

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw training curves (loss, accuracy, lr, kNN top-1) to a PNG",
                       description="Draw loss, instance accuracy, learning rate and kNN top-1 against the epoch "
                                   "from the steps.jsonl and metrics.jsonl of `mocohub train` runs; several "
                                   f"runs share the axes, named by their folders. Needs matplotlib: {PLOT_INSTALL}.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (the --out of mocohub train)")
    p.add_argument("-o", "--out", metavar="PNG",
                   help=f"default: RUN_DIR/{CURVES_NAME} for one run, ./{CURVES_NAME} for several")
    add_json_flag(p, "command, runs, out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = args.out or (Path(args.runs[0]) / CURVES_NAME if len(args.runs) == 1 else Path(CURVES_NAME))
    out = plot_runs(args.runs, out)
    what = args.runs[0] if len(args.runs) == 1 else f"{len(args.runs)} runs"
    emit({"command": "plot", "runs": args.runs, "out": str(out)},
         f"curves of {what} (loss, instance accuracy, lr, kNN top-1) -> {out}", args.json)
    return 0
