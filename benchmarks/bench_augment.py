"""Two-view augmentation throughput per CPU core: the PIL pipeline against the batched one.

Both start from decoded images in memory (``--jpeg``: from JPEG bytes, decoding included), in one
process on one thread. The batched pipeline's time is its loader part (crops and parameter draws,
per image) plus its batch part (collate and photometry on whole batches) on ``--device``.
The variants run in turns, ``--repeats`` rounds, each timed by the process's CPU time (on a
machine shared with other jobs, wall time also counts the waits for a core), best round kept.

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


def _clock(device: str) -> float:
    return time.perf_counter() if device == "cuda" else time.process_time()


def _pil(name: str, size: int, images: list, batch: int, device: str) -> float:
    views = two_views(name, size)
    start = _clock(device)
    for item in images:
        views(_decode(item))
    return _clock(device) - start


def _batched(name: str, size: int, images: list, batch: int, device: str, tensors: bool = False) -> float:
    views = BatchedTwoViews(name, size)
    if tensors:  # the image cache hands workers uint8 tensors
        images = [pil_to_uint8(_decode(item)) for item in images]
    start = _clock(device)
    for i in range(0, len(images), batch):
        crops = default_collate([views(_decode(item)) for item in images[i:i + batch]])
        q, k = views.augment(crops, device)
    if device == "cuda":
        torch.cuda.synchronize()
    return _clock(device) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jpeg", action="store_true", help="include JPEG decoding in both")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all variants in turn (best kept)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, 1 thread, batched photometry on {args.device}, "
          f"{'wall' if args.device == 'cuda' else 'CPU'} time"
          f"{', JPEG decoding included' if args.jpeg else ', decoded images'}")
    for name in args.recipes:
        size, source, n, batch = CASES[name]
        images = _images(source, n, args.jpeg)
        variants = {"PIL": _pil, "batched": _batched}
        if not args.jpeg:
            variants["batched, from cached tensors"] = lambda *a: _batched(*a, tensors=True)
        _batched(name, size, images[:batch], batch, args.device)  # warm-up
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(args.repeats):  # in turns: a slow spell of the machine hits every variant alike
            for label, run in variants.items():
                best[label] = min(best[label], run(name, size, images, batch, args.device))
        rates = {label: n / seconds for label, seconds in best.items()}
        print(f"\n{name}, {size} px from {source[0]}x{source[1]}, {n} images, batch {batch}")
        for label, rate in rates.items():
            print(f"  {label:30s} {rate:8.0f} pairs/s  x{rate / rates['PIL']:.2f}")


if __name__ == "__main__":
    main()
