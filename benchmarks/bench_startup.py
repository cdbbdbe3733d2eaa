"""Start-up against the data set's size: listing, fingerprint, image cache, loader workers' memory.

For each size (10k, 100k, 300k files by default) a folder of tiny JPEGs (8 x 8, 100 classes) is
written under ``--tmp`` and deleted after. Timed: listing it (``ImageFolder``, no cache), the
resume fingerprint of its names, and, extrapolated linearly, both for ImageNet's 1.28 million
files. Measured: the memory of two forked loader workers (USS and PSS from
``/proc/PID/smaps_rollup``) after the first batch and after one epoch over the folder, the
images decoded and returned as tensors (no cache). The image cache is timed apart, on
``--cifar`` (CIFAR-10 JPEGs, 32 px): its decode per image on one thread (process CPU time: the
cost per core) and on ``DECODE_THREADS`` threads (wall time). Run it on the code of another
commit with ``PYTHONPATH`` pointing at that package to compare: it uses only what both have.

    python benchmarks/bench_startup.py                                  # 10k, 100k, 300k
    python benchmarks/bench_startup.py --sizes 10000 --cache-images 5000 --json
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mocohub.data import cache as cache_module
from mocohub.data.convert import pil_to_uint8
from mocohub.data.folder import ImageFolder, collate_images
from mocohub.training.resume import data_fingerprint

IMAGENET_FILES = 1_281_167
CLASSES = 100
WORKERS = 2


def _tiny_jpegs(n: int = 64) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "JPEG")
        out.append(buffer.getvalue())
    return out


def _write_folder(root: Path, files: int) -> None:
    """``files`` JPEGs in ``CLASSES`` class folders, ImageNet-like names."""
    jpegs = _tiny_jpegs()
    for c in range(CLASSES):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(c, files, CLASSES):
            (folder / f"n{c:08d}_{i}.JPEG").write_bytes(jpegs[i % len(jpegs)])


def _memory(pid: int) -> dict[str, float]:
    """USS (private pages) and PSS of a process, in MB."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    uss = fields["Private_Clean"] + fields["Private_Dirty"]
    return {"uss_mb": round(uss / 1e6, 1), "pss_mb": round(fields["Pss"] / 1e6, 1)}


def _record_pid(folder: str, freeze: bool):
    def init(worker: int) -> None:
        Path(folder, f"{worker}.pid").write_text(str(os.getpid()))
        if freeze:  # the objects inherited from the parent out of the worker's cycle collections
            gc.freeze()
    return init


def _worker_memory(ds: ImageFolder, folder: str, freeze: bool) -> dict[str, float]:
    """Workers' memory (mean of ``WORKERS``) after the first batch and after the epoch, and the epoch's seconds."""
    loader = DataLoader(ds, batch_size=256, num_workers=WORKERS, collate_fn=collate_images,
                        multiprocessing_context="fork", persistent_workers=True,
                        worker_init_fn=_record_pid(folder, freeze))
    batches = iter(loader)
    start = time.perf_counter()
    next(batches)
    pids = [int(Path(folder, f"{w}.pid").read_text()) for w in range(WORKERS)]
    first = [_memory(pid) for pid in pids]
    for _ in batches:
        pass
    seconds = time.perf_counter() - start
    last = [_memory(pid) for pid in pids]
    del batches, loader

    def mean(rows: list[dict], key: str) -> float:
        return round(sum(r[key] for r in rows) / len(rows), 1)
    return {"epoch_s": round(seconds, 1), "uss_first_mb": mean(first, "uss_mb"), "uss_epoch_mb": mean(last, "uss_mb"),
            "pss_first_mb": mean(first, "pss_mb"), "pss_epoch_mb": mean(last, "pss_mb")}


def bench_size(files: int, tmp: str, memory: bool, freeze: bool) -> dict:
    with tempfile.TemporaryDirectory(dir=tmp, prefix="bench-startup-") as work:
        root = Path(work) / "data"
        _write_folder(root, files)
        start = time.perf_counter()
        ds = ImageFolder(root, pil_to_uint8)
        listed = time.perf_counter() - start
        start = time.perf_counter()
        data_fingerprint(ds.root, (p for p, _ in ds.samples))
        fingerprinted = time.perf_counter() - start
        row = {"files": files, "list_s": round(listed, 2), "fingerprint_s": round(fingerprinted, 2),
               "us_per_file": round((listed + fingerprinted) / files * 1e6, 2),
               "imagenet_s": round((listed + fingerprinted) / files * IMAGENET_FILES, 1)}
        if memory:
            pids = Path(work) / "pids"
            pids.mkdir()
            row.update(_worker_memory(ds, str(pids), freeze))
        return row


def bench_cache(cifar: str, images: int) -> dict:
    """The image cache's decode of ``images`` CIFAR-10 JPEGs: per image on one thread (CPU time) and on all."""
    paths = [p for p, _ in ImageFolder(cifar).samples][:images]
    budget = 1 << 30
    row = {"images": len(paths), "threads": cache_module.DECODE_THREADS}
    for threads, key in ((1, "one_thread"), (cache_module.DECODE_THREADS, "all_threads")):
        cache_module.DECODE_THREADS = threads
        cpu, wall = time.process_time(), time.perf_counter()
        cache_module.ImageCache(paths, budget)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        row[f"{key}_cpu_us"] = round(cpu / len(paths) * 1e6)
        row[f"{key}_wall_us"] = round(wall / len(paths) * 1e6)
    cache_module.DECODE_THREADS = row["threads"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the folders are written (and deleted)")
    parser.add_argument("--cifar", default="/tmp/cifar10/train", help="CIFAR-10 JPEGs for the image cache")
    parser.add_argument("--cache-images", type=int, default=10_000, help="0: no cache figures")
    parser.add_argument("--no-memory", action="store_true", help="skip the loader workers' epoch")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() in each loader worker as it starts (its full collections then skip "
                             "the inherited objects)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"cpu": _cpu_name(), "cores": os.cpu_count()}
    if args.cache_images and os.path.isdir(args.cifar):
        result["cache"] = bench_cache(args.cifar, args.cache_images)
        if not args.json:
            c = result["cache"]
            print(f"image cache, {c['images']} CIFAR-10 JPEGs: {c['one_thread_cpu_us']} us CPU per image on one "
                  f"thread, {c['all_threads_wall_us']} us wall per image on {c['threads']} threads")
    result["sizes"] = []
    for files in args.sizes:
        row = bench_size(files, args.tmp, not args.no_memory, args.gc_freeze)
        result["sizes"].append(row)
        if not args.json:
            line = (f"{files} files: list {row['list_s']} s, fingerprint {row['fingerprint_s']} s "
                    f"({row['us_per_file']} us per file; {row['imagenet_s']} s for ImageNet)")
            if "epoch_s" in row:
                line += (f"; workers' USS {row['uss_first_mb']} -> {row['uss_epoch_mb']} MB, PSS "
                         f"{row['pss_first_mb']} -> {row['pss_epoch_mb']} MB over the epoch ({row['epoch_s']} s)")
            print(line, flush=True)
    if args.json:
        print(json.dumps(result))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
