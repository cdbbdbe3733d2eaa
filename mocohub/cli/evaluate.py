"""``mocohub extract``, ``mocohub knn`` and ``mocohub lincls``: what a frozen MoCo backbone is worth."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from ..data.folder import DEFAULT_WORKERS, ImageFolder, collate_images
from ..errors import MocohubError
from ..evaluation.classifier import save_classifier
from ..evaluation.embeddings import Embeddings, compute_embeddings, concat_embeddings
from ..evaluation.extract import extract_embeddings
from ..evaluation.knn import knn_classify
from ..evaluation.linear import DEFAULT_WEIGHT_DECAYS, PROTOCOLS, fast_linear_probe, resolve_protocol, train_linear_head
from ..evaluation.transforms import linear_cfg, train_transform
from ..precision import PRECISIONS
from ..zoo.loading import from_pretrained
from ..zoo.pretrained import WEIGHTS_NAME
from ..zoo.transforms import transform_for

__all__ = ["add_parser", "run"]


def _common(p: argparse.ArgumentParser, batch_size: int | None = 256) -> None:
    p.add_argument("model", metavar="MODEL", help="zoo name, folder, checkpoint file, URL or hf-hub:org/repo")
    p.add_argument("--batch-size", type=int, default=batch_size, metavar="N")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, metavar="N", help="image decoding processes")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS), help="autocast dtype")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster with bf16/fp16)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _labelled(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, metavar="DIR", help="labelled folder: DIR/<class>/<image>")
    p.add_argument("--val", required=True, metavar="DIR", help="labelled folder with the same classes")


def add_parser(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("extract", help="embeddings of every image of a folder to a safetensors file",
                       description="Embed every image under IMAGE_DIR (recursively) and write OUT (safetensors: "
                                   "'embeddings', 'labels'; paths, classes and skipped files in the metadata). "
                                   "Resumable: an interrupted run continues with --resume.", formatter_class=fmt)
    _common(p, batch_size=64)
    p.add_argument("image_dir", metavar="IMAGE_DIR")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--no-normalize", dest="normalize", action="store_false", help="raw, not L2-normalised, features")
    p.add_argument("--shard-size", type=int, default=4096, metavar="N", help="images per resumable shard")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and any interrupted run)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run into OUT")
    p.set_defaults(func=run)

    p = sub.add_parser("knn", help="weighted kNN top-1/top-5 of a frozen backbone",
                       description="Weighted kNN classification (as the official MoCo CIFAR-10 demo): "
                                   "val images vote with the labels of their k nearest train images.",
                       formatter_class=fmt)
    _common(p)
    _labelled(p)
    p.add_argument("--k", type=int, default=200, help="neighbours (clipped to the train size)")
    p.add_argument("--t", type=float, default=0.1, help="temperature of the exp(similarity / t) weights")
    p.set_defaults(func=run)

    p = sub.add_parser("lincls", help="linear evaluation: train an fc on a frozen backbone",
                       description="The official linear protocol (frozen backbone in eval mode, fc N(0, 0.01), "
                                   "SGD; v1: lr 30, 100 epochs, x0.1 at 60 and 80, batch 256; v3: lr 0.1*batch/256, "
                                   "cosine, 90 epochs, batch 1024), or --fast: L-BFGS on features computed once. "
                                   "OUT gets backbone + fc (from_pretrained(OUT, num_classes=None) loads both) "
                                   "and metrics.jsonl.", formatter_class=fmt)
    _common(p, batch_size=None)
    _labelled(p)
    p.add_argument("--out", required=True, metavar="DIR", help="export folder for backbone + classifier")
    p.add_argument("--overwrite", action="store_true", help="replace a classifier already in --out")
    p.add_argument("--protocol", default="v1", choices=tuple(PROTOCOLS))
    proto = p.add_argument_group("protocol overrides (default: the protocol's value)")
    proto.add_argument("--epochs", type=int)
    proto.add_argument("--lr", type=float)
    proto.add_argument("--momentum", type=float)
    proto.add_argument("--wd", dest="weight_decay", type=float)
    proto.add_argument("--schedule", choices=("step", "cosine"))
    proto.add_argument("--milestones", type=int, nargs="*", metavar="EPOCH")
    proto.add_argument("--input-size", type=int, help="crop size (default: the model's pretrained_cfg)")
    proto.add_argument("--crop-pct", type=float, help="val center-crop fraction (default: the model's)")
    fast = p.add_argument_group("fast probe")
    fast.add_argument("--fast", action="store_true", help="L-BFGS logistic regression on cached features")
    fast.add_argument("--fast-aug", type=int, default=0, metavar="N", help="add N RRC+flip copies of train")
    fast.add_argument("--fast-wd", type=float, nargs="+", default=list(DEFAULT_WEIGHT_DECAYS), metavar="WD",
                      help="weight decays tried (chosen on a 20%% hold-out of train)")
    p.set_defaults(func=run)


def _device(args: argparse.Namespace) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _loader(folder: str, transform: Callable, args: argparse.Namespace, *, shuffle: bool = False,
            batch_size: int | None = None) -> DataLoader:
    data = ImageFolder(folder, transform, on_error="skip")
    return DataLoader(data, batch_size=batch_size or args.batch_size or 256, shuffle=shuffle,
                      num_workers=args.workers, collate_fn=collate_images, pin_memory=_device(args).type == "cuda")


def _classes(train: DataLoader, val: DataLoader) -> list[str]:
    train_classes, val_classes = train.dataset.classes, val.dataset.classes
    if not train_classes:
        raise MocohubError(f"{train.dataset.root} has no class sub-folders: labels come from DIR/<class>/<image>")
    if train_classes != val_classes:
        raise MocohubError(f"train and val folders have different classes ({len(train_classes)} vs "
                           f"{len(val_classes)}): use the same class sub-folder names")
    return train_classes


def _emit(record: dict[str, Any], path: Path | None = None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if path is not None:
        with open(path, "a") as f:
            f.write(line + "\n")


def _embed(model, loader: DataLoader, args: argparse.Namespace, **kwargs: Any) -> Embeddings:
    return compute_embeddings(model, loader, device=_device(args), precision=args.precision,
                              channels_last=args.channels_last, progress=not args.quiet, **kwargs)


def _knn(args: argparse.Namespace) -> int:
    model = from_pretrained(args.model)
    train = _loader(args.train, model.eval_transform, args)
    val = _loader(args.val, model.eval_transform, args)
    classes = _classes(train, val)
    metrics = knn_classify(_embed(model, train, args), _embed(model, val, args), len(classes), k=args.k, t=args.t)
    _emit({"command": "knn", "model": args.model, **metrics})
    return 0


def _lincls(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / WEIGHTS_NAME).exists() and not args.overwrite:
        raise MocohubError(f"{out} already holds a model: pass --overwrite to replace it")
    metrics_file = out / "metrics.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    metrics_file.unlink(missing_ok=True)
    model = from_pretrained(args.model)
    cfg = linear_cfg(model, input_size=args.input_size, crop_pct=args.crop_pct)
    val = _loader(args.val, transform_for(cfg), args)
    if args.fast:
        train = _loader(args.train, transform_for(cfg), args)
        classes = _classes(train, val)
        parts = [_embed(model, train, args, normalize=False)]
        for _ in range(args.fast_aug):
            parts.append(_embed(model, _loader(args.train, train_transform(cfg), args), args, normalize=False))
        train_emb = concat_embeddings(parts)._replace(failed=parts[0].failed)
        head, metrics = fast_linear_probe(train_emb, _embed(model, val, args, normalize=False), len(classes),
                                          weight_decays=args.fast_wd)
        metrics = {"command": "lincls", "mode": "fast", "fast_aug": args.fast_aug, **metrics}
        _emit(metrics, metrics_file)
    else:
        protocol = resolve_protocol(args.protocol, epochs=args.epochs, lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay, schedule=args.schedule,
                                    batch_size=args.batch_size,
                                    milestones=tuple(args.milestones) if args.milestones is not None else None)
        train = _loader(args.train, train_transform(cfg), args, shuffle=True, batch_size=protocol.batch_size)
        classes = _classes(train, val)
        head, metrics = train_linear_head(
            model, train, val, len(classes), protocol, device=_device(args), precision=args.precision,
            channels_last=args.channels_last, progress=not args.quiet,
            on_epoch=lambda m: _emit({"command": "lincls", "mode": args.protocol, **m}, metrics_file))
        metrics = {"mode": args.protocol, **metrics}
    save_classifier(model.cpu(), head, out, classes=classes, metrics=metrics)
    return 0


def _extract(args: argparse.Namespace) -> int:
    model = from_pretrained(args.model)
    out = extract_embeddings(model, args.image_dir, args.out, batch_size=args.batch_size, workers=args.workers,
                             device=_device(args), precision=args.precision, channels_last=args.channels_last,
                             normalize=args.normalize, shard_size=args.shard_size, overwrite=args.overwrite,
                             resume=args.resume, progress=not args.quiet, model_name=args.model)
    _emit({"command": "extract", "model": args.model, "out": str(out)})
    return 0


def run(args: argparse.Namespace) -> int:
    return {"extract": _extract, "knn": _knn, "lincls": _lincls}[args.command](args)
