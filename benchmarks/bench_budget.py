"""Issue 23's benchmark: a useful CIFAR-10 backbone from a CPU in an hour, as one command.

    python benchmarks/bench_budget.py                      # all 50,000 training images, --time-budget 60m

The CIFAR-10 JPEG archive (``../shared/data/cifar10-jpg.tar.gz``, or ``--data``/``$CIFAR_TAR``) is
unpacked once under ``--out`` (default /tmp/bench-budget); ``mocohub train --recipe cifar-cpu --time-budget`` runs as a
user would (one process, the kNN monitor on the 10,000 test images every ``--knn-every`` epochs: the curve); the
exported backbone is loaded with ``from_pretrained`` and scored by weighted kNN (k 200, T 0.1) on
the test images, next to the same network randomly initialised with BN statistics fitted to the
training images (so the gap is learning, not statistics). Writes OUT/results.json and
OUT/budget_curve.png, and prints the table row for benchmarks/README.md. ``--per-class`` and a
short ``--budget`` make a toy run (``--per-class 20 5 --budget 40s -- --arch test_resnet --batch-size 32
--moco-k 32``: about a minute).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ablation_* beside this script
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mocohub from this checkout when not installed

from ablation_data import prepare_data  # noqa: E402
from ablation_report import machine  # noqa: E402

from mocohub.evaluation.knn import folder_knn_top1  # noqa: E402
from mocohub.jsonlog import read_jsonl  # noqa: E402
from mocohub.run_folder import RunFolder  # noqa: E402
from mocohub.training.record import read_record  # noqa: E402
from mocohub.zoo import from_pretrained  # noqa: E402
from mocohub.zoo.pretrained import build_model  # noqa: E402

# GPU results for scale (kNN top-1 on CIFAR-10 test, ResNet-18, 200 epochs)
GPU_REFERENCES = {"official MoCo CIFAR-10 demo (V100, ~67 min)": 82.6, "lightly MoCo v2 (112 min)": 84.7}


def random_twin(trained: torch.nn.Module) -> torch.nn.Module:
    """The trained network's architecture (its config's timm name, ``model_args`` and stem: a
    mocohub name such as resnet10t_half is timm's resnet10t with narrower channels), untrained."""
    torch.manual_seed(0)
    return build_model(trained.mocohub_config)


@torch.no_grad()
def random_baseline(trained: torch.nn.Module, train: Path, val: Path) -> float:
    """kNN top-1 of the trained network's architecture, randomly initialised, BN fitted."""
    return folder_knn_top1(random_twin(trained), train, val, fit_bn=True)


def plot(curve: list[dict], random_top1: float | None, trained_top1: float, title: str, out: Path,
         scored_on: str = "the test images") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9.5, 4.2), constrained_layout=True)
    epochs = [r["epoch"] + 1 for r in curve if "knn_top1" in r]
    ax.plot(epochs, [r["knn_top1"] for r in curve if "knn_top1" in r], "o-", label="kNN monitor (head output)")
    ax.axhline(trained_top1, color="C1", label=f"exported backbone: {trained_top1:.1f} %")
    if random_top1 is not None:
        ax.axhline(random_top1, color="grey", ls="--", label=f"random init, BN fitted: {random_top1:.1f} %")
        for i, (name, value) in enumerate(GPU_REFERENCES.items()):
            ax.axhline(value, color=f"C{i + 2}", ls=":", label=f"{name}: {value} %")
    ax.set(xlabel="epoch", ylabel=f"kNN top-1 on {scored_on} (%)", title=title)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylim(top=max([*(r["knn_top1"] for r in curve if "knn_top1" in r), trained_top1,
                         *(GPU_REFERENCES.values() if random_top1 is not None else ())]) + 4)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: never on a line
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="the CIFAR-10 JPEG archive or folder (default: found)")
    p.add_argument("--out", type=Path, default=Path("/tmp/bench-budget"))
    p.add_argument("--budget", default="60m", help="mocohub train --time-budget")
    p.add_argument("--recipe", default="cifar-cpu")
    p.add_argument("--knn-every", type=int, default=4,
                   help="the curve's points: each kNN pass costs about a third of an epoch's training")
    p.add_argument("--per-class", type=int, nargs=2, default=None, metavar=("TRAIN", "TEST"),
                   help="a toy subset instead of all 5,000 + 1,000 images per class")
    p.add_argument("--held-out", action="store_true",
                   help="--data's val/ is held out of the training images (choosing a recipe): no baseline")
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="after --: more mocohub train flags")
    args = p.parse_args(argv)
    images = prepare_data(args.data, args.out, tuple(args.per_class) if args.per_class else (None, None))
    run = args.out / "run"
    extra = [f for f in args.train_flags if f != "--"]
    command = [sys.executable, "-m", "mocohub.cli.main", "train", str(images.train), "--recipe", args.recipe,
               "--time-budget", args.budget, "--val", str(images.val), "--out", str(run), "--restart",
               "--knn-every", str(args.knn_every), "--no-progress", *extra]
    print(" ".join(command), flush=True)
    start = time.monotonic()
    subprocess.run(command, check=True)
    wall_s = time.monotonic() - start
    record, curve = read_record(RunFolder(run).record), read_jsonl(RunFolder(run).metrics)
    trained = from_pretrained(str(run / "backbone"))
    trained_top1 = folder_knn_top1(trained, images.train, images.val)
    random_top1 = None if args.held_out else random_baseline(trained, images.train, images.val)
    plan = record["plan"]
    result = {"budget": args.budget, "wall_s": round(wall_s, 1), "plan": plan, "images": images.n_train,
              "test_images": images.n_val, "knn_top1_backbone": round(trained_top1, 2),
              "knn_top1_random_bn_fitted": random_top1 and round(random_top1, 2), "held_out": args.held_out,
              "knn_curve": [{"epoch": r["epoch"] + 1, "knn_top1": r.get("knn_top1")} for r in curve],
              "precision": record["precision"], "precision_why": record["precision_why"], "machine": machine(),
              "gpu_references": GPU_REFERENCES, "command": command}
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    title = (f"CIFAR-10, {images.n_train:,} images, --time-budget {args.budget}\non "
             f"{result['machine']['cpu_capability']}, {record['precision']} ({record['precision_why']})")
    plot(curve, random_top1, trained_top1, title, args.out / "budget_curve.png",
         "the held-out images" if args.held_out else "the test images")
    baseline = "" if random_top1 is None else f" {random_top1:.1f} % |"
    print(f"| {args.budget} | {result['machine']['cpu_capability']} {record['precision']} | {plan['epochs']} epochs "
          f"of {plan['steps_per_epoch']:,} steps | {wall_s / 60:.1f} min | {trained_top1:.1f} % |{baseline}")
    print(f"results: {args.out / 'results.json'}, plot: {args.out / 'budget_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
