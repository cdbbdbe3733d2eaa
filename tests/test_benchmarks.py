"""The speed benchmarks run end to end at toy size and print every variant they promise.

Their numbers are not asserted (speed claims live in benchmarks/README.md, measured side by side);
this keeps the scripts that gpu_check.sh and the README run from rotting as the package changes.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RATE = r"\s+\d+ pairs/s  x\d+\.\d\d$"


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bench_augment_times_every_variant_of_both_recipes():
    out = _run("bench_augment.py", "--images", "8", "--repeats", "1")
    for recipe in ("cifar, 32 px", "moco-v2, 224 px"):
        section = out[out.index(recipe):]
        for label in ("PIL", "batched", "batched, from cached tensors", "loader part only (GPU photometry)"):
            assert re.search(rf"^  {re.escape(label)}{RATE}", section, re.M), (label, section)
    assert re.search(rf"^  PIL{RATE}", out, re.M).group(0).endswith("x1.00")


def test_bench_step_reports_the_official_step_and_mocohub_side_by_side():
    out = _run("bench_step.py", "--batch", "8", "--size", "16", "--repeats", "1")
    report = json.loads(out.strip().splitlines()[-1])
    rates = report["images_per_s"]
    assert {"official (fp32, NCHW)", "mocohub fp32", "mocohub auto, 8 BN groups"} <= set(rates)
    assert all(rate > 0 for rate in rates.values())
    assert report["momentum_ms"]["loop"] > 0 and report["momentum_ms"]["foreach"] > 0


def test_bench_load_compares_from_pretrained_with_torch_load():
    out = _run("bench_load.py", "--repeats", "1")
    assert re.search(r"^torch\.load \+ torchvision resnet50\(\) \+ load_state_dict\s+\d+\.\d ms", out, re.M)
    assert re.search(r"^mocohub\.from_pretrained\(saved folder\)\s+\d+\.\d ms", out, re.M)
    assert re.search(r"^ratio \(baseline / mocohub\): x\d+\.\d\d$", out, re.M)


def test_bench_budget_baseline_is_the_trained_networks_architecture_untrained(tmp_path):
    """resnet10t_half exports as timm's resnet10t with narrower channels: its random baseline must
    be that network (a full-width resnet10t once stood in for it), with fresh weights."""
    import torch

    import mocohub
    from mocohub.backbones import create_resnet
    sys.path.insert(0, str(BENCHMARKS))
    from bench_budget import random_twin

    source = create_resnet("resnet10t_half", stem="cifar")
    torch.save(source.state_dict(), tmp_path / "half.pth")
    trained = mocohub.from_pretrained(tmp_path / "half.pth")
    twin = random_twin(trained)
    shapes = {k: v.shape for k, v in trained.state_dict().items()}
    assert {k: v.shape for k, v in twin.state_dict().items()} == shapes and twin.num_features == 256
    assert twin.conv1.stride == trained.conv1.stride == (1, 1)  # the CIFAR stem
    assert not torch.equal(twin.conv1.weight, trained.conv1.weight)
