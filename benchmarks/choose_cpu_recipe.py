"""Issue 23, item 2: a CPU recipe for small images, chosen on images held out of the training set.

    python benchmarks/choose_cpu_recipe.py [--budget 10m] [--candidates NAME,NAME] [--out DIR] [-- FLAGS]

CIFAR-10's 50,000 training images are split once: the first ``--hold`` (500) file names of each
class are held out, the other 45,000 are trained on (hard links under OUT/select). Each candidate
(a set of `mocohub train` flags, CANDIDATES below) runs as ``bench_budget.py --held-out`` does:
``mocohub train --time-budget BUDGET`` with the kNN monitor on the held-out images, its exported
backbone scored by weighted kNN on them. The test images are never read here: they are scored once,
by ``bench_budget.py``, with the candidate chosen. A candidate already in OUT/choice.jsonl is skipped
(run the command again to continue). Writes OUT/choice.md (the table) and OUT/choice.jsonl. Flags
after ``--`` go to every candidate's `mocohub train`, after its own (a toy run: ``--data SMALL_FOLDER
--hold 5 --budget 40s --candidates test_resnet -- --batch-size 32 --moco-k 64``).

Run it on each CPU kind (capped to AVX2: ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``) with
another ``--out``: the precision, hence the step time and the epochs that fit, follow the hardware.
``--steps`` only times each candidate's MoCo step (its network and batch; 8 BN groups, K 4096, MLP head,
32 px, ``--precision auto``, random data, the median of 6 steps after 2) and prints the epochs of 50,000 images
an hour holds: what a candidate costs, in a minute, before an hour is spent on it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_budget, ablation_* beside this script
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mocohub from this checkout when not installed

import bench_budget  # noqa: E402
from ablation_data import class_images, prepare_data  # noqa: E402
from ablation_report import machine  # noqa: E402

from mocohub.jsonlog import append_jsonl, read_jsonl  # noqa: E402

# `mocohub train --recipe cifar` flags on top of the recipe (ResNet-18, 3x3 stem, 32 px, K 4096, cosine).
# The network decides the epochs an hour holds on 2 cores (MoCo steps measured 2026-12-07, epochs of
# 50,000 per hour on AMX bf16 / AVX2 fp32: ResNet-18 3x3 stem 6.5 / about 2, resnet10t 11.6 / -,
# ResNet-18 ImageNet stem 34.6 / 14.6, test_resnet 45.8 / 12.0: benchmarks/README.md), so the
# candidates trade capacity for epochs; v2's MLP head and T 0.2 learn faster in few epochs (the demo).
CANDIDATES: dict[str, list[str]] = {
    "resnet18": ["--arch", "resnet18", "--batch-size", "256", "--mlp", "true", "--moco-t", "0.2"],
    "resnet10t": ["--arch", "resnet10t", "--batch-size", "256", "--mlp", "true", "--moco-t", "0.2"],
    "test_resnet": ["--arch", "test_resnet", "--batch-size", "256", "--mlp", "true", "--moco-t", "0.2"],
    "resnet18-imagenet-stem": ["--arch", "resnet18", "--stem", "imagenet", "--batch-size", "256", "--mlp", "true",
                               "--moco-t", "0.2"],
    # the winner of the above with twice the updates per epoch (the lr follows the batch: 0.06 x 128/512),
    # or twice the learning rate (0.06 against the linear scaling rule's 0.03 at batch 256)
    "test_resnet-b128": ["--arch", "test_resnet", "--batch-size", "128", "--mlp", "true", "--moco-t", "0.2"],
    "test_resnet-lr0.06": ["--arch", "test_resnet", "--batch-size", "256", "--mlp", "true", "--moco-t", "0.2",
                           "--lr", "0.06"],
    # capacity between test_resnet (96 features) and resnet10t (512): resnet10t at half width (256), 1.1-1.3x
    # test_resnet's step; judged at --budget 30m beside test_resnet (10 minutes favour fast starters)
    "resnet10t_half": ["--arch", "resnet10t_half", "--batch-size", "256", "--mlp", "true", "--moco-t", "0.2"],
}


def held_out_split(train: Path, dest: Path, hold: int) -> Path:
    """DEST/train (all but the first ``hold`` names of each class) and DEST/val (those), hard-linked."""
    if (dest / "val").is_dir():
        return dest
    partial = dest / ".partial"
    for cls, names in class_images(train).items():
        for split, chosen in (("val", names[:hold]), ("train", names[hold:])):
            (partial / split / cls).mkdir(parents=True, exist_ok=True)
            for name in chosen:
                os.link(train / cls / name, partial / split / cls / name)
    for split in ("train", "val"):
        (partial / split).rename(dest / split)
    partial.rmdir()
    return dest


def _flag(flags: list[str], name: str, default: str) -> str:
    return flags[flags.index(name) + 1] if name in flags else default


def step_rate(flags: list[str]) -> tuple[float, str]:
    """Seconds per MoCo step of the candidate with ``flags``, and the precision ``auto`` picked."""
    import torch

    from mocohub import MoCo
    from mocohub.precision import autocast, resolve_channels_last, resolve_precision

    precision = resolve_precision("auto", "cpu")[0]
    layout = torch.channels_last if resolve_channels_last(None, precision) else torch.contiguous_format
    batch = int(_flag(flags, "--batch-size", "512"))
    torch.manual_seed(0)
    model = MoCo(_flag(flags, "--arch", "resnet18"), dim=128, K=4096, m=0.99, T=0.2, mlp=True,
                 stem=_flag(flags, "--stem", "cifar"), bn_splits=8).to(memory_format=layout)
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.03, momentum=0.9)
    views = [torch.randn(batch, 3, 32, 32).contiguous(memory_format=layout) for _ in range(2)]
    times = []
    for _ in range(8):
        start = time.perf_counter()
        with autocast(torch.device("cpu"), precision):
            loss = model(*views, return_loss=True)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]), precision


def _row(name: str, result: dict) -> str:
    plan = result["plan"]
    return (f"| {name} | `{' '.join(CANDIDATES[name])}` | {plan['epochs']} x {plan['steps_per_epoch']:,} steps "
            f"| {result['precision']} | {plan['step_s']:.2f} s | {result['wall_s'] / 60:.1f} min | **{result['knn_top1_backbone']:.1f}** |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="the CIFAR-10 JPEG archive or folder (default: found)")
    p.add_argument("--out", type=Path, default=Path("/tmp/cpu-recipe"))
    p.add_argument("--budget", default="10m", help="each candidate's --time-budget")
    p.add_argument("--hold", type=int, default=500, help="training images held out per class")
    p.add_argument("--knn-every", type=int, default=1,
                   help="the monitor's epochs (every one costs about 25 s on 5,000 images: use 4 for budgets of 30m+)")
    p.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated names of CANDIDATES")
    p.add_argument("--steps", action="store_true", help="only time each candidate's MoCo step (random data)")
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="after --: more mocohub train flags")
    args = p.parse_args(argv)
    extra = [f for f in args.train_flags if f != "--"]
    chosen = args.candidates.split(",")
    unknown = [c for c in chosen if c not in CANDIDATES]
    if unknown:
        p.error(f"unknown candidate(s) {', '.join(unknown)}; choose from {', '.join(CANDIDATES)}")
    if args.steps:
        for name in chosen:
            seconds, precision = step_rate(CANDIDATES[name])
            batch = int(_flag(CANDIDATES[name], "--batch-size", "512"))
            print(f"{name}: {seconds:.3f} s/step ({precision}), {batch / seconds:,.0f} img/s, "
                  f"{3600 * batch / seconds / 50_000:.1f} epochs of 50,000 per hour", flush=True)
        return 0
    images = prepare_data(args.data, args.out, (None, None))
    select = held_out_split(images.train, args.out / "select", args.hold)
    log = args.out / "choice.jsonl"
    done = {row["name"]: row for row in read_jsonl(log)}
    for name in chosen:
        if name in done:
            continue
        run = args.out / "runs" / name
        bench_budget.main(["--data", str(select), "--out", str(run), "--budget", args.budget, "--held-out",
                           "--recipe", "cifar", "--knn-every", str(args.knn_every), "--", *CANDIDATES[name], *extra])
        result = {"name": name, **json.loads((run / "results.json").read_text())}
        append_jsonl(log, [result])
        done[name] = result
    info, trained_on = machine(), sum(map(len, class_images(select / "train").values()))
    lines = [f"# A CPU recipe for CIFAR-10: candidates at --time-budget {args.budget}",
             "", f"{select / 'train'}: {trained_on:,} training images; kNN (k 200, T 0.1) of the exported backbone on "
             f"{sum(map(len, class_images(select / 'val').values())):,} images held out of CIFAR-10's training set. Machine: CPU capability "
             f"{info['cpu_capability']}.", "",
             "| candidate | flags (on `--recipe cifar`) | plan | precision | step | wall | held-out kNN top-1 (%) |",
             "|---|---|---|---|---|---|---|", *(_row(n, done[n]) for n in CANDIDATES if n in done)]
    (args.out / "choice.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
