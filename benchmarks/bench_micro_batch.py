"""Peak memory and time per image of a MoCo v3 step with and without ``--micro-batch`` (issue 22).

Each setting runs in a fresh process (peak RSS is per process and never goes down): the model of
``--recipe moco-v3`` (``--arch``, projector/predictor widths 4096/256, LARS), random views at
``--size`` px, one warm-up step, then ``--steps`` timed steps. Prints a table and one JSON line.

    python benchmarks/bench_micro_batch.py                 # resnet18, 64 px: 256/32, 32, 256
    python benchmarks/bench_micro_batch.py --steps 1 --size 32 --settings 16/8 8 16   # a smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time

__all__ = ["measure", "main"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(arch: str, size: int, batch: int, micro: int | None, steps: int) -> dict[str, float]:
    """One setting, in this process: peak RSS after the model is built and after the steps, and
    seconds per image over the timed steps."""
    import torch

    from mocohub.algorithm import MoCoV3
    from mocohub.training.microbatch import micro_step
    from mocohub.training.optim import v3_optimizer

    torch.manual_seed(0)
    model = MoCoV3(arch, 256, 4096, T=1.0)
    optimizer = v3_optimizer(model.parameters(), "lars", 0.6 * batch / 256, weight_decay=1e-6, momentum=0.9)
    x1, x2 = (torch.randn(batch, 3, size, size) for _ in range(2))
    built = _rss_mb()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if micro:
            micro_step(model, x1, x2, 0.99, micro, backward=lambda t: t.backward(), autocast=contextlib.nullcontext)
        else:
            model(x1, x2, 0.99).backward()
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    return {"model_rss_mb": built, "peak_rss_mb": _rss_mb(), "ms_per_image": 1000 * seconds / (steps * batch)}


def _setting(text: str) -> tuple[int, int | None]:
    batch, _, micro = text.partition("/")
    return int(batch), int(micro) if micro else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--settings", nargs="+", default=["256/32", "32", "256"], metavar="BATCH[/MICRO]")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one setting in this fresh process
        print(json.dumps(measure(args.arch, args.size, *_setting(args.child), args.steps)))
        return 0
    rows = {}
    for text in args.settings:
        done = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--size", str(args.size),
                               "--steps", str(args.steps), "--child", text], capture_output=True, text=True, check=True)
        rows[text] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{args.arch}, {args.size} px, {args.steps} timed steps; peak RSS of a fresh process each")
    print(f"  {'batch/micro':<12} {'model MB':>9} {'peak MB':>8} {'steps MB':>9} {'ms/image':>9}")
    for text, r in rows.items():
        print(f"  {text:<12} {r['model_rss_mb']:>9.0f} {r['peak_rss_mb']:>8.0f} "
              f"{r['peak_rss_mb'] - r['model_rss_mb']:>9.0f} {r['ms_per_image']:>9.2f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
