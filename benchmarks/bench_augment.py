"""Two-view augmentation throughput per CPU core: the PIL pipeline against the batched one.

Both start from decoded images in memory (``--jpeg``: from JPEG bytes, decoding included), in one
process on one thread, and both end at the (query, key) float batches a training step takes: the
PIL pipeline's per-image tensors are collated as the DataLoader does. The batched pipeline's time
is its loader part (crops and parameter draws, per image) plus its batch part (collate and
photometry on whole batches) on ``--device``; on the CPU a last variant times the loader part and
the collate alone: the CPU's share when a GPU does the photometry (``--aug-device auto`` on a GPU
machine). The variants take turns batch by batch, ``--repeats`` rounds, timed by the process's
CPU time (on a machine shared with other jobs, wall time also counts the waits for a core); the
best round of each is kept.

    python benchmarks/bench_augment.py                     # cifar at 32 px and moco-v2 at 224 px
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_augment.py
    python benchmarks/bench_augment.py --device cuda       # photometry on the GPU
"""
from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from mocohub.data.augment import two_views
from mocohub.data.batched import BatchedTwoViews
from mocohub.data.convert import pil_to_uint8

CASES = {"cifar": (32, (32, 32), 1024, 256), "moco-v2": (224, (500, 375), 96, 32)}  # size, source, images, batch


def _images(source: tuple[int, int], n: int, jpeg: bool) -> list:
    """Smooth random colour images (JPEG-compressible like photos), decoded or as JPEG bytes."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (source[1] // 8, source[0] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(source, Image.BILINEAR)
        if jpeg:
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
        else:
            out.append(img)
    return out


def _decode(item) -> Image.Image:
    return Image.open(io.BytesIO(item)).convert("RGB") if isinstance(item, bytes) else item


def _on_gpu(device: str) -> bool:
    """Whether ``device`` names a GPU ("cuda", "cuda:0"...): its work is timed by the wall clock."""
    return torch.device(device).type == "cuda"


def _clock(device: str) -> float:
    return time.perf_counter() if _on_gpu(device) else time.process_time()


def _pil(name: str, size: int, device: str):
    """Per image, then collated as the DataLoader does: like the batched variants, it ends at
    the (query, key) float batches a training step takes."""
    views = two_views(name, size)

    def run(images: list) -> float:
        start = _clock(device)
        default_collate([views(_decode(item)) for item in images])
        return _clock(device) - start
    return run


def _batched(name: str, size: int, device: str, photometry: bool = True):
    """``photometry=False``: the loader part and the collate alone, the CPU's work when the
    training device does the photometry (``--aug-device auto`` on a GPU)."""
    views = BatchedTwoViews(name, size)

    def run(images: list) -> float:
        start = _clock(device)
        crops = default_collate([views(_decode(item)) for item in images])
        if photometry:
            views.augment(crops, device)
        if _on_gpu(device):
            torch.cuda.synchronize(device)
        return _clock(device) - start
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jpeg", action="store_true", help="include JPEG decoding in both")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all variants in turn (best kept)")
    parser.add_argument("--images", type=int, help="at most this many images per recipe (a quick check; the "
                        "defaults are 1024 at 32 px, 96 at 224 px)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, 1 thread, batched photometry on {args.device}, "
          f"{'wall' if _on_gpu(args.device) else 'CPU'} time"
          f"{', JPEG decoding included' if args.jpeg else ', decoded images'}")
    for name in args.recipes:
        size, source, n, batch = CASES[name]
        n = min(n, args.images or n)
        batch = min(batch, n)
        images = _images(source, n, args.jpeg)
        variants = {"PIL": (_pil(name, size, args.device), images),
                    "batched": (_batched(name, size, args.device), images)}
        if not args.jpeg:  # what the image cache hands the loader workers
            cached = [pil_to_uint8(i) for i in images]
            variants["batched, from cached tensors"] = (_batched(name, size, args.device), cached)
            if not _on_gpu(args.device):
                variants["loader part only (GPU photometry)"] = (_batched(name, size, args.device, False), cached)
        for run, items in variants.values():  # warm-up
            run(items[:batch])
        totals = {label: [0.0] * args.repeats for label in variants}
        for r in range(args.repeats):  # batch by batch in turns: a slow spell of the machine hits every variant alike
            for i in range(0, n, batch):
                for label, (run, items) in variants.items():
                    totals[label][r] += run(items[i:i + batch])
        rates = {label: n / min(seconds) for label, seconds in totals.items()}
        print(f"\n{name}, {size} px from {source[0]}x{source[1]}, {n} images, batch {batch}")
        for label, rate in rates.items():
            print(f"  {label:34s} {rate:8.0f} pairs/s  x{rate / rates['PIL']:.2f}")


if __name__ == "__main__":
    main()
