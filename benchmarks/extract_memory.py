"""Peak memory of `mocohub extract` on 5,000 and on 50,000 images: it should stay nearly flat, since
images stream through the loader shard by shard; only the [N, D] embeddings grow with N.

A random ResNet-18 (CIFAR stem, 16 px) export embeds generated 16 px PNGs, in a subprocess per
size; /proc is polled every 50 ms for the resident memory of the command and its loader workers.

    python benchmarks/extract_memory.py [--sizes 5000 50000] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import mocohub
from mocohub.zoo.pretrained import build_config, build_model, pretrained_cfg_for


def make_images(root: Path, n: int, size: int = 16, classes: int = 10) -> Path:
    """``n`` noise PNGs in ``classes`` folders (content does not matter for memory)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"class{i % classes}" / f"{i:06d}.png", compress_level=1)
    return root


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the loader workers)."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*"):
            try:
                pids += [int(c) for c in (task / "children").read_text().split()]
            except FileNotFoundError:
                pass
        i += 1
    return pids


def measure(cmd: list[str]) -> tuple[float, int, int]:
    """(seconds, peak RSS of the main process, peak summed RSS of the process tree), both in KiB."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    main_peak = tree_peak = 0
    while proc.poll() is None:
        pids = _tree(proc.pid)
        main_peak = max(main_peak, _rss_kib(proc.pid))
        tree_peak = max(tree_peak, sum(_rss_kib(p) for p in pids))
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()}")
    return time.perf_counter() - start, main_peak, tree_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="extract-memory-") as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        config = build_config("resnet18", num_features=512, stem="cifar", pretrained_cfg=pretrained_cfg_for(16))
        mocohub.save_pretrained(build_model(config).eval(), root / "model")
        for n in args.sizes:
            images = make_images(root / f"images-{n}", n)
            cmd = [sys.executable, "-m", "mocohub", "extract", str(root / "model"), str(images),
                   str(root / f"emb-{n}.safetensors"), "--device", "cpu", "--precision", "fp32", "--quiet",
                   "--workers", str(args.workers), "--batch-size", str(args.batch_size)]
            seconds, main_kib, tree_kib = measure(cmd)
            rows.append((n, seconds, main_kib / 1024, tree_kib / 1024, n * 512 * 4 / 2**20))
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{os.cpu_count()} CPUs, --workers {args.workers}, --batch-size {args.batch_size}")
    print("\n| images | seconds | peak RSS, main (MiB) | peak RSS, with workers (MiB) | embeddings (MiB) |")
    print("|---|---|---|---|---|")
    for n, seconds, main_mib, tree_mib, emb in rows:
        print(f"| {n:,} | {seconds:.0f} | {main_mib:.0f} | {tree_mib:.0f} | {emb:.0f} |")


if __name__ == "__main__":
    main()
