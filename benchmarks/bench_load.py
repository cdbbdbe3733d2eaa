"""Loading a saved ResNet-50 backbone: ``mocohub.from_pretrained(folder)`` next to the usual
``torch.load`` + ``torchvision.models.resnet50()`` + ``load_state_dict``.

Both variants start from files on disk (the page cache is warm after the first repeat) and end
with a model whose weights are the saved ones; they run alternately in one process and the
median of the repeats is reported, with the ratio and the CPU capability.

    python benchmarks/bench_load.py --repeats 7
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision

import mocohub
from mocohub.zoo.pretrained import build_config, write_pretrained


def _timed(fn: Callable[[], torch.nn.Module]) -> tuple[float, torch.nn.Module]:
    start = time.perf_counter()
    model = fn()
    return time.perf_counter() - start, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        source = torchvision.models.resnet50()
        source.fc = torch.nn.Identity()
        state_dict = source.state_dict()
        folder = write_pretrained(Path(tmp) / "saved", state_dict, build_config("resnet50", num_features=2048))
        torch.save(state_dict, Path(tmp) / "resnet50.pth")

        def plain() -> torch.nn.Module:
            model = torchvision.models.resnet50()
            model.fc = torch.nn.Identity()
            model.load_state_dict(torch.load(Path(tmp) / "resnet50.pth", map_location="cpu", weights_only=True))
            return model.eval()

        variants = {"torch.load + torchvision resnet50() + load_state_dict": plain,
                    "mocohub.from_pretrained(saved folder)": lambda: mocohub.from_pretrained(folder)}
        times: dict[str, list[float]] = {name: [] for name in variants}
        x = torch.randn(2, 3, 64, 64)
        outputs = {}
        for _ in range(args.repeats):
            for name, load in variants.items():
                seconds, model = _timed(load)
                times[name].append(seconds)
                with torch.no_grad():
                    outputs[name] = model(x)
        a, b = outputs.values()
        assert torch.equal(a, b), "the two loads disagree"

    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, threads: {torch.get_num_threads()}, "
          f"torch {torch.__version__}, repeats: {args.repeats}")
    medians = {name: statistics.median(ts) * 1000 for name, ts in times.items()}
    for name, ms in medians.items():
        print(f"{name:<58} {ms:8.1f} ms (median)")
    baseline, ours = medians.values()
    print(f"ratio (baseline / mocohub): x{baseline / ours:.2f}")


if __name__ == "__main__":
    main()
