"""CIFAR-10 linear evaluation: the fast probe (L-BFGS on cached features) next to the official
protocol (SGD on a frozen backbone, RRC+flip), same backbone, accuracy and wall time.

    python benchmarks/bench_linear_probe.py --model runs/cifar/backbone --train-per-class 500 --epochs 10

The data comes from ../shared/data/cifar10-jpg.tar.gz, unpacked under --workdir (never the repo).
Without --model a randomly initialised ResNet-18 (CIFAR stem) is used: the timing holds, the
accuracy is a random-feature baseline. One JSON line per method on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import tarfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import mocohub
from mocohub.data.folder import ImageFolder, collate_images
from mocohub.evaluation.embeddings import compute_embeddings, concat_embeddings
from mocohub.evaluation.linear import fast_linear_probe, resolve_protocol, train_linear_head
from mocohub.evaluation.transforms import linear_cfg, train_transform
from mocohub.zoo.pretrained import build_config, build_model, pretrained_cfg_for

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"


def unpack(archive: Path, workdir: Path) -> Path:
    """Unpack once; a marker file says the extraction finished."""
    done = workdir / ".unpacked"
    if not done.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(workdir, filter="data")
        done.touch()
    return workdir


def subset(split: Path, per_class: int, dest: Path) -> Path:
    """The first ``per_class`` images of each class, as symlinks (0 = all)."""
    if per_class <= 0:
        return split
    for cls in sorted(p for p in split.iterdir() if p.is_dir()):
        (dest / cls.name).mkdir(parents=True, exist_ok=True)
        for img in sorted(cls.iterdir())[:per_class]:
            link = dest / cls.name / img.name
            if not link.exists():
                os.symlink(img, link)
    return dest


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a MoCo backbone (anything from_pretrained accepts); default: random R18")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mocohub-cifar10"))
    p.add_argument("--train-per-class", type=int, default=500, help="0: all 5000")
    p.add_argument("--val-per-class", type=int, default=200, help="0: all 1000")
    p.add_argument("--epochs", type=int, default=10, help="official protocol epochs (100 in the paper)")
    p.add_argument("--lr", type=float, default=30.0, help="official protocol lr")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--fast-aug", type=int, default=0, help="augmented copies of train for the fast probe")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-official", action="store_true")
    args = p.parse_args(argv)

    root = unpack(args.data, args.workdir)
    train_dir = subset(root / "train", args.train_per_class, args.workdir / f"train-{args.train_per_class}")
    val_dir = subset(root / "test", args.val_per_class, args.workdir / f"test-{args.val_per_class}")
    if args.model:
        model = mocohub.from_pretrained(args.model)
    else:
        torch.manual_seed(0)
        model = build_model(build_config("resnet18", num_features=512, stem="cifar",
                                         pretrained_cfg=pretrained_cfg_for(32, (0.4914, 0.4822, 0.4465),
                                                                           (0.2470, 0.2435, 0.2616))))
    cfg = linear_cfg(model)
    opts = dict(precision=args.precision, channels_last=args.channels_last)

    def loader(folder, transform, shuffle=False):
        return DataLoader(ImageFolder(folder, transform, on_error="skip"), batch_size=args.batch_size,
                          shuffle=shuffle, num_workers=args.workers, collate_fn=collate_images)

    common = {"model": args.model or "random resnet18 (cifar stem)", "train_images": None,
              "val_images": None, "threads": torch.get_num_threads(), **opts}
    results = []
    start = time.perf_counter()
    train_loader, val_loader = loader(train_dir, mocohub.transform_for(cfg)), loader(val_dir, mocohub.transform_for(cfg))
    parts = [compute_embeddings(model, train_loader, normalize=False, **opts)]
    for _ in range(args.fast_aug):
        parts.append(compute_embeddings(model, loader(train_dir, train_transform(cfg)), normalize=False, **opts))
    train = concat_embeddings(parts)
    val = compute_embeddings(model, val_loader, normalize=False, **opts)
    embed_s = time.perf_counter() - start
    _, fast = fast_linear_probe(train, val, 10)
    common.update(train_images=len(parts[0].labels), val_images=len(val.labels))
    results.append({"method": "fast", "fast_aug": args.fast_aug, "top1": fast["top1"], "top5": fast["top5"],
                    "weight_decay": fast["weight_decay"], "embed_s": round(embed_s, 1),
                    "time_s": round(time.perf_counter() - start, 1), **common})
    print(json.dumps(results[-1]), flush=True)
    if not args.skip_official:
        protocol = resolve_protocol("v1", epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                    milestones=(round(0.6 * args.epochs), round(0.8 * args.epochs)))
        start = time.perf_counter()
        _, official = train_linear_head(model, loader(train_dir, train_transform(cfg), shuffle=True), val_loader,
                                        10, protocol, **opts)
        results.append({"method": "official", "epochs": args.epochs, "lr": args.lr, "top1": official["top1"],
                        "best_top1": official["best_top1"], "top5": official["top5"],
                        "time_s": round(time.perf_counter() - start, 1), **common})
        print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main()
