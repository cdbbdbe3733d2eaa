"""Reading images from WebDataset shards next to reading them from the folder they were written from.

Per data set (CIFAR-10's 32 px JPEGs; generated 320x256 JPEGs, the size a 224-px crop is taken
from), three readers decode images to the uint8 tensors the augmentation starts from:
"folder" (``ImageFolder``, the sampler's random order), "shards, by index" (``ShardImages``, the
same random order, each image read at its offset), and "shards, webdataset stream" (webdataset's
own reader, in shard order: the ecosystem's reference). Each runs in a forked process, alone,
timed by that process's CPU time (images/s per loader core: what a loader worker sustains; the
machine is shared, so wall time would measure the neighbours), best of ``--rounds``, with its
resident memory growth (RSS). The page cache is warm: files come from memory for all three.

Then what webdataset's streaming reader gives the trainer's guarantees, measured on the CIFAR
shards: samples per process when ``split_by_node`` deals the shards to 2, 3 and 8 processes (a
global batch keeps processes in step, so the fewest decide), and what resuming at mid-epoch reads.

    python benchmarks/bench_shards.py                     # about 2 min: CIFAR-10 train + 2,000 images
    python benchmarks/bench_shards.py --cifar DIR --images 200 --seconds 0.5 --rounds 1   # a quick check
"""
from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from mocohub.data.convert import load_rgb, pil_to_uint8
from mocohub.data.folder import ImageFolder
from mocohub.data.shards import ShardImages, scan_shard, write_shards

PER_RANK_BATCH = 128  # a global batch of 256 over 2 processes, 384 over 3, 1,024 over 8


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def cpu_kind() -> str:
    with open("/proc/cpuinfo") as f:
        name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores"


def generate_224(root: Path, n: int) -> Path:
    """``n`` photo-like JPEGs of 320x256 (smooth colour fields plus grain) in 10 class folders."""
    if len(list(root.rglob("*.jpg"))) == n:
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((320, 256), Image.BICUBIC)
        grain = rng.normal(0, 6, (256, 320, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
        path = root / f"c{i % 10}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
    return root


def _decode(data: bytes) -> torch.Tensor:
    return pil_to_uint8(load_rgb(io.BytesIO(data)))


def _indexed(make: Callable[[], ImageFolder], seconds: float) -> tuple[float, int, float]:
    """(setup seconds, images decoded, CPU seconds) over the sampler's random order."""
    start = time.perf_counter()
    data = make()
    setup = time.perf_counter() - start
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    cpu0, n = time.process_time(), 0
    while n < len(order) and time.process_time() - cpu0 < seconds:
        data[order[n]]
        n += 1
    return setup, n, time.process_time() - cpu0


def _streamed(pattern: str, seconds: float) -> tuple[float, int, float]:
    import webdataset as wds
    start = time.perf_counter()
    stream = iter(wds.WebDataset(pattern, shardshuffle=False))
    setup = time.perf_counter() - start
    cpu0, n = time.process_time(), 0
    for sample in stream:
        _decode(next(v for k, v in sample.items() if k in ("jpg", "jpeg", "png")))
        n += 1
        if time.process_time() - cpu0 >= seconds:
            break
    return setup, n, time.process_time() - cpu0


def _child(run: Callable[[], tuple[float, int, float]], conn) -> None:
    before = rss_mb()
    setup, n, cpu = run()
    conn.send((setup, n, cpu, rss_mb() - before))


def measure(run: Callable[[], tuple[float, int, float]]) -> tuple[float, int, float, float]:
    """Run in a forked process (its own memory growth, no page shared with earlier variants)."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(run, child))
    proc.start()
    result = parent.recv()
    proc.join()
    return result


def compare(name: str, folder: Path, pattern: str, seconds: float, rounds: int) -> None:
    variants = {
        "folder": lambda: _indexed(lambda: ImageFolder(folder, pil_to_uint8), seconds),
        "shards, by index": lambda: _indexed(lambda: ShardImages(pattern, pil_to_uint8), seconds),
        "shards, webdataset stream": lambda: _streamed(pattern, seconds),
    }
    best: dict[str, tuple] = {}
    for _ in range(rounds):  # the variants take turns, so a busy spell of the machine hits all alike
        for label, run in variants.items():
            setup, n, cpu, rss = measure(run)
            if label not in best or n / cpu > best[label][1] / best[label][2]:
                best[label] = (setup, n, cpu, rss)
    print(f"\n{name}")
    print(f"  {'reader':28s} {'images/s per core':>18s} {'vs folder':>9s} {'setup s':>8s} {'RSS growth MB':>14s}")
    base = best["folder"][1] / best["folder"][2]
    for label, (setup, n, cpu, rss) in best.items():
        print(f"  {label:28s} {n / cpu:18.0f} {n / cpu / base:8.2f}x {setup:8.2f} {rss:14.0f}")


def stream_deal(pattern: str, total: int) -> None:
    """What webdataset's split_by_node gives each process, and the global batches in lockstep."""
    import webdataset as wds
    print("\nwebdataset stream, split_by_node over the CIFAR-10 shards (per-process batch "
          f"{PER_RANK_BATCH}); the index reader: every image once per epoch whatever the process count")
    print(f"  {'processes':>9s} {'samples per process':>30s} {'in lockstep':>12s} {'index reader':>13s}")
    for world in (2, 3, 8):
        counts = []
        for rank in range(world):
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
            try:
                counts.append(sum(1 for _ in wds.WebDataset(pattern, nodesplitter=wds.split_by_node,
                                                            shardshuffle=False)))
            except ValueError:  # no shard dealt to this process
                counts.append(0)
        steps = min(counts) // PER_RANK_BATCH
        batch = PER_RANK_BATCH * world
        print(f"  {world:9d} {' / '.join(str(c) for c in counts):>30s} {steps * batch:12d} "
              f"{total // batch * batch:13d}")
    for key in ("RANK", "WORLD_SIZE"):
        os.environ.pop(key)


def resume_cost(pattern: str, total: int) -> None:
    """Resuming at mid-epoch: a stream reads its way there; the index reader seeks."""
    import webdataset as wds
    start, read, n = time.perf_counter(), 0, 0
    for sample in wds.WebDataset(pattern, shardshuffle=False):
        read += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
        n += 1
        if n == total // 2:
            break
    stream = time.perf_counter() - start
    start = time.perf_counter()
    data = ShardImages(pattern)
    index = time.perf_counter() - start
    start = time.perf_counter()
    for path in data.shards:
        scan_shard(path)
    scan = time.perf_counter() - start
    print(f"\nresume at mid-epoch (sample {total // 2:,} in shard order): the stream reads {n:,} samples "
          f"({read / 1e6:.0f} MB) in {stream:.2f} s to get there (and another process count deals other "
          f"shards); the index reader loads the shards' index files once ({index:.2f} s; {scan:.2f} s to "
          "scan the tar headers where there are none) and then reads only the images left")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cifar", default="/tmp/cifar10/train", help="CIFAR-10 as JPEG class folders")
    p.add_argument("--images", type=int, default=2000, help="generated 320x256 JPEGs")
    p.add_argument("--work", default="/tmp/bench-shards", help="where the generated images and the shards go")
    p.add_argument("--shard-size", type=int, default=16 * 10 ** 6, help="bytes per shard (several shards)")
    p.add_argument("--seconds", type=float, default=3.0, help="CPU seconds per reader and round")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    work = Path(args.work)
    print(f"CPU: {cpu_kind()}; one process per reader, images decoded to uint8 tensors, warm page cache")
    sets = {"CIFAR-10 train, 32 px JPEG": Path(args.cifar),
            "generated, 320x256 JPEG (for 224-px crops)": generate_224(work / "img224", args.images)}
    patterns = {}
    for name, folder in sets.items():
        start = time.perf_counter()
        written = write_shards(folder, work / f"shards-{folder.name}", shard_bytes=args.shard_size)
        patterns[name] = written["pattern"]
        print(f"{name}: {written['images']:,} images, {len(written['shards'])} shards of "
              f"{written['bytes'] / len(written['shards']) / 1e6:.0f} MB ({time.perf_counter() - start:.1f} s "
              f"to write or check)")
    for name, folder in sets.items():
        compare(name, folder, patterns[name], args.seconds, args.rounds)
    cifar = patterns["CIFAR-10 train, 32 px JPEG"]
    total = len(ImageFolder(sets["CIFAR-10 train, 32 px JPEG"]))
    stream_deal(cifar, total)
    resume_cost(cifar, total)


if __name__ == "__main__":
    main()
