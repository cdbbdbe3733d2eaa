"""MoCo step speed: mocohub next to a transcription of the official code, measured in one run.

    python benchmarks/bench_step.py [--arch resnet18 --size 32 --batch 128 --repeats 5 --rounds 1] [--compile]

Prints images/s for each variant and the ratio to the official-style step: fp32, ``auto`` (what
``--precision auto`` picks on this hardware), bf16 + channels_last, the 8-group SplitBatchNorm of
the single-device default, torch.compile (with --compile) and lightly's MoCo step when lightly is
importable (it is not a dependency: run this script from a virtualenv that has it). With
``--rounds N`` the variants take turns N times in one process (noisy shared CPUs drift: each row
then shows its lowest and highest round). Then the momentum update alone (per-parameter Python
loop vs one torch._foreach call).
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
from mocohub.precision import autocast, resolve_channels_last, resolve_precision  # noqa: E402


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


def _step_fn(model, opt, x_q, x_k, precision: str, loss_fn=None):
    def step():
        with autocast(x_q.device, precision):
            loss = loss_fn(x_q, x_k) if loss_fn else F.cross_entropy(*model(x_q, x_k))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _lightly_step(arch: str, cifar: bool, device: torch.device):
    """lightly 1.6's MoCo example: torchvision trunk, MoCoProjectionHead(512, 512, 128),
    NTXentLoss with a 4096 memory bank, update_momentum(m=0.99), no Shuffle BN."""
    import copy

    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    resnet = getattr(torchvision.models, arch)()
    if cifar:
        resnet.conv1, resnet.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    backbone = torch.nn.Sequential(*list(resnet.children())[:-1]).to(device)
    head = MoCoProjectionHead(resnet.fc.in_features, 512, 128).to(device)
    backbone_k, head_k = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_k)
    deactivate_requires_grad(head_k)
    criterion = NTXentLoss(memory_bank_size=(4096, 128))

    def loss_fn(x_q, x_k):
        update_momentum(backbone, backbone_k, m=0.99)
        update_momentum(head, head_k, m=0.99)
        q = head(backbone(x_q).flatten(start_dim=1))
        with torch.no_grad():
            k = head_k(backbone_k(x_k).flatten(start_dim=1))
        return criterion(q, k)
    params = list(backbone.parameters()) + list(head.parameters())
    return torch.nn.ModuleList([backbone, head, backbone_k, head_k]), params, loss_fn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1, help="interleave the variants this many times")
    p.add_argument("--device", default="cpu", help="e.g. cuda")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd encoders (slow to start)")
    args = p.parse_args()
    device = torch.device(args.device)
    cifar = args.size <= 64
    torch.manual_seed(0)
    x_q, x_k = (torch.randn(args.batch, 3, args.size, args.size, device=device) for _ in range(2))
    auto, why = resolve_precision("auto", device)
    auto_cl = resolve_channels_last("auto", auto)
    print(f"{device} ({torch.backends.cpu.get_cpu_capability() if device.type == 'cpu' else torch.cuda.get_device_name()}):"
          f" auto = {auto}{' + channels_last' if auto_cl else ''} ({why})")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer sets it
    variants = {  # label: (implementation, precision, channels_last, BN splits, compile)
        "official (fp32, NCHW)": ("official", "fp32", False, 1, False),
        "mocohub fp32": ("mocohub", "fp32", False, 1, False),
        f"mocohub auto ({auto})": ("mocohub", auto, auto_cl, 1, False),
        "mocohub bf16 + channels_last": ("mocohub", "bf16", True, 1, False),
        "mocohub auto, 8 BN groups": ("mocohub", auto, auto_cl, 8, False),
    }
    if args.compile:
        variants[f"mocohub auto + compile"] = ("mocohub", auto, auto_cl, 1, True)
    try:
        import lightly  # noqa: F401
        variants["lightly 1.6 (fp32)"] = ("lightly", "fp32", False, 1, False)
    except ImportError:
        print("lightly is not installed here: its column is skipped")
    steps = {}
    for label, (impl, precision, channels_last, splits, compiled) in variants.items():
        loss_fn = None
        if impl == "official":
            model = ReferenceMoCo(args.arch, dim=128, K=4096, m=0.99, T=0.1, cifar_stem=cifar)
            params = model.encoder_q.parameters()
        elif impl == "lightly":
            model, params, loss_fn = _lightly_step(args.arch, cifar, device)
        else:
            model = MoCo(args.arch, dim=128, K=4096, m=0.99, T=0.1, stem="cifar" if cifar else "imagenet",
                         bn_splits=splits)
            params = model.encoder_q.parameters()
            if compiled:
                model.encoder_q.compile()
                model.encoder_k.compile()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(device, memory_format=fmt)
        opt = torch.optim.SGD(params, lr=0.06, momentum=0.9, weight_decay=5e-4)
        steps[label] = _step_fn(model, opt, x_q.contiguous(memory_format=fmt), x_k.contiguous(memory_format=fmt),
                                precision, loss_fn)
    rounds = {label: [] for label in steps}
    for _ in range(args.rounds):
        for label, step in steps.items():
            rounds[label].append(args.batch / _time(step, args.repeats))
    results = {label: max(ips) for label, ips in rounds.items()}
    base = rounds["official (fp32, NCHW)"]
    for label, ips in rounds.items():
        ratios = [a / b for a, b in zip(ips, base)]  # each round against the official step of the same round
        spread = f"   rounds {min(ips):.1f}-{max(ips):.1f} img/s, x{min(ratios):.2f}-{max(ratios):.2f}" \
            if args.rounds > 1 else ""
        print(f"{label:32s} {max(ips):8.1f} img/s   x{max(ips) / max(base):.2f}{spread}")
    del steps

    model = MoCo(args.arch, dim=128, K=4096).to(device)
    k, q = list(model.encoder_k.parameters()), list(model.encoder_q.parameters())

    def loop():
        with torch.no_grad():
            for pk, pq in zip(k, q):
                pk.data = pk.data * 0.999 + pq.data * (1.0 - 0.999)

    t_loop, t_foreach = _time(loop, 20), _time(lambda: momentum_update_(k, q, 0.999), 20)
    print(f"momentum update over {len(k)} tensors: loop {1e3 * t_loop:.2f} ms, foreach {1e3 * t_foreach:.2f} ms, "
          f"x{t_loop / t_foreach:.2f}")
    print(json.dumps({"args": vars(args), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "auto": auto, "auto_why": why, "images_per_s": results, "rounds": rounds,
                      "momentum_ms": {"loop": 1e3 * t_loop, "foreach": 1e3 * t_foreach}}))


if __name__ == "__main__":
    main()
