"""MoCo step speed: mocohub next to a transcription of the official code, measured in one run.

    python benchmarks/bench_step.py [--arch resnet18 --size 32 --batch 128 --repeats 5]

Prints images/s for each variant and the ratio to the official-style step, plus the momentum
update alone (per-parameter Python loop vs one torch._foreach call) on the encoder's parameters.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_moco import ReferenceMoCo  # noqa: E402  (the official semantics, written plainly)

from mocohub import MoCo  # noqa: E402
from mocohub.algorithm import momentum_update_  # noqa: E402


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync()
    return (time.perf_counter() - start) / repeats


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _step_fn(model, opt, x_q, x_k, precision: str):
    def step():
        with torch.autocast(x_q.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(*model(x_q, x_k))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", help="e.g. cuda")
    args = p.parse_args()
    device = torch.device(args.device)
    cifar = args.size <= 64
    torch.manual_seed(0)
    x_q, x_k = (torch.randn(args.batch, 3, args.size, args.size, device=device) for _ in range(2))
    results = {}
    variants = {
        "official (fp32, NCHW)": ("official", "fp32", False),
        "mocohub fp32": ("mocohub", "fp32", False),
        "mocohub bf16 + channels_last": ("mocohub", "bf16", True),
    }
    for label, (impl, precision, channels_last) in variants.items():
        if impl == "official":
            model = ReferenceMoCo(args.arch, dim=128, K=4096, m=0.99, T=0.1, cifar_stem=cifar)
        else:
            model = MoCo(args.arch, dim=128, K=4096, m=0.99, T=0.1, stem="cifar" if cifar else "imagenet")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(device, memory_format=fmt)
        opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
        seconds = _time(_step_fn(model, opt, x_q.contiguous(memory_format=fmt), x_k.contiguous(memory_format=fmt),
                                 precision), args.repeats)
        results[label] = args.batch / seconds
    base = results["official (fp32, NCHW)"]
    for label, ips in results.items():
        print(f"{label:32s} {ips:8.1f} img/s   x{ips / base:.2f}")

    model = MoCo(args.arch, dim=128, K=4096).to(device)
    k, q = list(model.encoder_k.parameters()), list(model.encoder_q.parameters())

    def loop():
        with torch.no_grad():
            for pk, pq in zip(k, q):
                pk.data = pk.data * 0.999 + pq.data * (1.0 - 0.999)

    t_loop, t_foreach = _time(loop, 20), _time(lambda: momentum_update_(k, q, 0.999), 20)
    print(f"momentum update over {len(k)} tensors: loop {1e3 * t_loop:.2f} ms, foreach {1e3 * t_foreach:.2f} ms, "
          f"x{t_loop / t_foreach:.2f}")
    print(json.dumps({"args": vars(args), "images_per_s": results,
                      "momentum_ms": {"loop": 1e3 * t_loop, "foreach": 1e3 * t_foreach}}))


if __name__ == "__main__":
    main()
