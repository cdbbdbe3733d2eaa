"""``mocohub extract``, ``knn``, ``lincls`` and ``eval``: what a frozen MoCo backbone is worth."""
from __future__ import annotations

import argparse
import json
import re
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from ..data.defaults import DEFAULT_WORKERS
from ..errors import MocohubError
from ..evaluation.protocol_settings import DEFAULT_WEIGHT_DECAYS, PROTOCOLS
from ..precision_names import PRECISION_CHOICES
from ..run_folder import BACKBONE, METRICS
from ..training.run_dir import fresh_run_dir
from ..zoo.names import HUB_PREFIX, WEIGHTS_NAME
from .output import add_json_flag, clean, count, duration, emit, num, pct, say, table

if TYPE_CHECKING:  # torch and the evaluation code are imported when a command runs, not to build the parser
    import torch
    from torch.utils.data import DataLoader

    from ..evaluation.embeddings import Embeddings

__all__ = ["add_parser", "run", "model_slug"]

KNN_KEYS = "command, model, top1, top5 (percent), k, t, num_train, num_val, failed, precision, seconds"
LINCLS_KEYS = ("command, model, mode (v1, v3 or fast), out, top1, top5 (percent), precision, seconds; "
               "official protocol: epoch, lr, loss, best_top1, time_s; fast: fast_aug, weight_decay, "
               "holdout_top1, num_train, num_val, fit_time_s")
EXTRACT_KEYS = "command, model, out, num_images, dim, failed, precision, seconds"
EVAL_KEYS = ("command, model, precision, seconds, results: [{protocol, top1, top5 (percent), seconds, settings}] "
             "(kNN and fast: settings.features_s, the shared feature pass, not in their seconds)")
SOURCE_HELP = "or WebDataset shards: a .tar file or a quoted brace pattern such as 'd/train-{000000..000127}.tar'"


class Hardware(NamedTuple):
    """Where and how the backbone runs, with ``auto`` resolved."""

    device: torch.device
    precision: str
    channels_last: bool


def _hardware(args: argparse.Namespace) -> Hardware:
    import torch

    from ..precision import resolve_channels_last, resolve_precision

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolve_precision(args.precision, device)[0]
    return Hardware(device, precision, resolve_channels_last(args.channels_last, precision))


def model_slug(source: str) -> str:
    """A short folder-name-safe name for a model source: zoo name, repo, folder or file name."""
    text = source.rstrip("/\\")
    if text.startswith(HUB_PREFIX):
        text = text[len(HUB_PREFIX):].split("@")[0]
    elif urllib.parse.urlparse(text).scheme in ("http", "https", "file"):
        text = urllib.parse.urlparse(text).path
    path = Path(text)
    name = path.parent.name if path.name == BACKBONE and path.parent.name else path.name
    name = re.sub(r"(\.pth)?\.(tar|pth|pt|bin|safetensors|ckpt)$", "", name)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def _positive(kind: Callable[[str], int | float]) -> Callable[[str], int | float]:
    """An argparse type for a count or a scale that must be above zero (``--k 0`` would score chance)."""
    def parse(text: str) -> int | float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def _common(p: argparse.ArgumentParser, batch_size: int | None = 256) -> None:
    p.add_argument("model", metavar="MODEL", help="zoo name, folder, checkpoint file, URL or hf-hub:org/repo")
    p.add_argument("--batch-size", type=_positive(int), default=batch_size, metavar="N")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, metavar="N", help="image decoding processes")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="autocast dtype; auto: bf16 where the device computes it natively, else fp32")
    p.add_argument("--channels-last", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                   help="NHWC memory format; auto: on with bf16/fp16, off with fp32")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _labelled(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, metavar="DIR", help=f"labelled folder: DIR/<class>/<image>, {SOURCE_HELP}")
    p.add_argument("--val", required=True, metavar="DIR", help="labelled folder (or shards) with the same classes")


def add_parser(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("extract", help="embeddings of every image of a folder to a safetensors file",
                       description="Embed every image under IMAGE_DIR (recursively) and write OUT (safetensors: "
                                   "'embeddings', 'labels'; paths, classes and skipped files in the metadata). "
                                   "Resumable: an interrupted run continues with --resume.", formatter_class=fmt)
    _common(p, batch_size=64)
    p.add_argument("image_dir", metavar="IMAGE_DIR", help=f"folder of images (searched recursively), {SOURCE_HELP}")
    p.add_argument("out", metavar="OUT", nargs="?",
                   help="default: a new runs/extract-<model>-<time>/embeddings.safetensors")
    p.add_argument("--no-normalize", dest="normalize", action="store_false", help="raw, not L2-normalised, features")
    p.add_argument("--shard-size", type=int, default=4096, metavar="N", help="images per resumable shard")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and any interrupted run)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run into OUT")
    add_json_flag(p, EXTRACT_KEYS)
    p.set_defaults(func=run)

    p = sub.add_parser("knn", help="weighted kNN top-1/top-5 of a frozen backbone",
                       description="Weighted kNN classification (as the official MoCo CIFAR-10 demo): "
                                   "val images vote with the labels of their k nearest train images.",
                       formatter_class=fmt)
    _common(p)
    _labelled(p)
    p.add_argument("--k", type=_positive(int), default=200, help="neighbours (clipped to the train size)")
    p.add_argument("--t", type=_positive(float), default=0.1, help="temperature of the exp(similarity / t) weights")
    add_json_flag(p, KNN_KEYS)
    p.set_defaults(func=run)

    p = sub.add_parser("lincls", help="linear evaluation: train an fc on a frozen backbone",
                       description="The official linear protocol (frozen backbone in eval mode, fc N(0, 0.01), "
                                   "SGD; v1: lr 30, 100 epochs, x0.1 at 60 and 80, batch 256; v3: lr 0.1*batch/256 "
                                   "(a ViT: 3*batch/256, the v3-vit protocol), cosine, 90 epochs, batch 1024), or --fast: L-BFGS on features computed once. "
                                   "OUT gets backbone + fc (from_pretrained(OUT, num_classes=None) loads both) "
                                   "and metrics.jsonl.", formatter_class=fmt)
    _common(p, batch_size=None)
    _labelled(p)
    p.add_argument("--out", metavar="DIR", help="export folder for backbone + classifier "
                                                "(default: a new runs/lincls-<model>-<time>)")
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
    add_json_flag(p, LINCLS_KEYS)
    p.set_defaults(func=run)

    p = sub.add_parser("eval", help="kNN, the fast probe and the official linear protocols in one table",
                       description="Every evaluation protocol of a frozen backbone on the same images, one row each "
                                   "with its settings, top-1, top-5 and seconds: weighted kNN and the fast linear "
                                   "probe (one feature pass shared by both), and with --official the official "
                                   "linear protocol (hours on ImageNet; --protocol v3 for v3's).", formatter_class=fmt)
    _common(p)
    _labelled(p)
    p.add_argument("--k", type=_positive(int), default=200, help="kNN neighbours (clipped to the train size)")
    p.add_argument("--t", type=_positive(float), default=0.1, help="kNN temperature")
    p.add_argument("--fast-wd", type=float, nargs="+", default=list(DEFAULT_WEIGHT_DECAYS), metavar="WD",
                   help="fast probe: weight decays tried (chosen on a 20%% hold-out of train)")
    p.add_argument("--official", action="store_true", help="add the official linear protocol (an fc trained by SGD)")
    p.add_argument("--protocol", nargs="+", default=["v1"], choices=("v1", "v3"),
                   help="the official protocols --official runs (v3 on a ViT: base lr 3)")
    p.add_argument("--epochs", type=_positive(int),
                   help="official protocols: epochs instead of the protocol's (None: its own)")
    add_json_flag(p, EVAL_KEYS)
    p.set_defaults(func=run)


def _loader(source: str, transform: Callable, args: argparse.Namespace, hw: Hardware, *, shuffle: bool = False,
            batch_size: int | None = None) -> DataLoader:
    from ..data.sources import open_images
    from ..evaluation.protocols import image_loader

    data = open_images(source, transform, on_error="skip")
    return image_loader(data, batch_size=batch_size or args.batch_size or 256, workers=args.workers,
                        device=hw.device, shuffle=shuffle)


def _classes(train: DataLoader, val: DataLoader) -> list[str]:
    from ..evaluation.protocols import shared_classes

    return shared_classes(train.dataset, val.dataset)


def _skipped(failed: list[str]) -> str:
    n = len(failed)
    return f"\nskipped {n} undecodable image{'s' * (n != 1)}, e.g. {failed[0]}" if failed else ""


def _embed(model, loader: DataLoader, args: argparse.Namespace, hw: Hardware, **kwargs: Any) -> Embeddings:
    from ..evaluation.embeddings import compute_embeddings

    return compute_embeddings(model, loader, device=hw.device, precision=hw.precision,
                              channels_last=hw.channels_last, progress=not args.quiet, **kwargs)


def _knn(args: argparse.Namespace, hw: Hardware, start: float) -> int:
    from ..evaluation.knn import knn_classify
    from ..zoo.loading import from_pretrained

    model = from_pretrained(args.model)
    train = _loader(args.train, model.eval_transform, args, hw)
    val = _loader(args.val, model.eval_transform, args, hw)
    classes = _classes(train, val)
    metrics = knn_classify(_embed(model, train, args, hw), _embed(model, val, args, hw), len(classes),
                           k=args.k, t=args.t, device=hw.device)
    seconds = time.perf_counter() - start
    human = (f"kNN top-1 {pct(metrics['top1'])}, top-5 {pct(metrics['top5'])} (k={metrics['k']}, "
             f"{count(metrics['num_val'])} val images, {hw.precision}, {duration(seconds)})"
             + _skipped(metrics["failed"]))
    emit({"command": "knn", "model": args.model, **metrics, "precision": hw.precision, "seconds": seconds},
         human, args.json)
    return 0


def _lincls_out(args: argparse.Namespace) -> Path:
    if args.out is None:
        return fresh_run_dir("lincls", model_slug(args.model))
    out = Path(args.out)
    if (out / WEIGHTS_NAME).exists() and not args.overwrite:
        raise MocohubError(f"{out} already holds a model: pass --overwrite to replace it")
    return out


def _lincls(args: argparse.Namespace, hw: Hardware, start: float) -> int:
    from ..data.sources import open_images
    from ..evaluation.classifier import save_classifier
    from ..evaluation.embeddings import concat_embeddings
    from ..evaluation.linear import fast_linear_probe, train_linear_head
    from ..evaluation.protocols import image_loader, official_protocol
    from ..evaluation.transforms import linear_cfg, train_transform
    from ..jsonlog import append_jsonl
    from ..zoo.loading import from_pretrained
    from ..zoo.transforms import transform_for

    out = _lincls_out(args)
    metrics_file = out / METRICS  # as a run folder names its epoch rows
    out.mkdir(parents=True, exist_ok=True)
    metrics_file.unlink(missing_ok=True)
    model = from_pretrained(args.model)
    cfg = linear_cfg(model, input_size=args.input_size, crop_pct=args.crop_pct)
    val = _loader(args.val, transform_for(cfg), args, hw)
    if args.fast:
        train = _loader(args.train, transform_for(cfg), args, hw)
        classes = _classes(train, val)
        parts = [_embed(model, train, args, hw, normalize=False)]
        for _ in range(args.fast_aug):
            parts.append(_embed(model, _loader(args.train, train_transform(cfg), args, hw), args, hw, normalize=False))
        train_emb = concat_embeddings(parts)._replace(failed=parts[0].failed)
        head, metrics = fast_linear_probe(train_emb, _embed(model, val, args, hw, normalize=False), len(classes),
                                          weight_decays=args.fast_wd, device=hw.device)
        metrics = {"command": "lincls", "mode": "fast", "fast_aug": args.fast_aug, **metrics}
        append_jsonl(metrics_file, [clean(metrics)])
        chosen = (f"wd {num(metrics['weight_decay'])}" + (" chosen on a 20 % hold-out" if len(args.fast_wd) > 1 else ""))
        summary = (f"linear probe (fast): top-1 {pct(metrics['top1'])}, top-5 {pct(metrics['top5'])} ({chosen}; "
                   f"{count(metrics['num_train'])} train / {count(metrics['num_val'])} val images")
    else:
        data = open_images(args.train, train_transform(cfg), on_error="skip")
        args.protocol, protocol, clipped = official_protocol(
            args.protocol, model, len(data), batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
            momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
            milestones=tuple(args.milestones) if args.milestones is not None else None)
        train = image_loader(data, batch_size=protocol.batch_size, workers=args.workers, device=hw.device,
                             shuffle=True)
        classes = _classes(train, val)
        if clipped:
            say(f"the {args.protocol} protocol's batch of {PROTOCOLS[args.protocol].batch_size} is more than the "
                f"{count(len(data))} training images: batch {protocol.batch_size}, lr {num(protocol.lr)} "
                "(--batch-size sets it)", args.json)

        def on_epoch(m: dict[str, Any]) -> None:
            append_jsonl(metrics_file, [clean({"command": "lincls", "mode": args.protocol, **m})])
            say(f"epoch {m['epoch']}/{protocol.epochs}: loss {num(m['loss'])}, val top-1 {pct(m['top1'])}, "
                f"top-5 {pct(m['top5'])}, lr {num(m['lr'])}", args.json)

        head, metrics = train_linear_head(model, train, val, len(classes), protocol, device=hw.device,
                                          precision=hw.precision, channels_last=hw.channels_last,
                                          progress=not args.quiet, on_epoch=on_epoch)
        metrics = {"command": "lincls", "mode": args.protocol, **metrics}
        summary = (f"linear eval ({args.protocol}, {protocol.epochs} epochs): top-1 {pct(metrics['top1'])}, "
                   f"top-5 {pct(metrics['top5'])}, best top-1 {pct(metrics['best_top1'])} "
                   f"({count(len(val.dataset))} val images")
    save_classifier(model.cpu(), head, out, classes=classes, metrics=metrics)
    seconds = time.perf_counter() - start
    human = (f"{summary}, {hw.precision}, {duration(seconds)})\n"
             f"classifier saved to {out}; load it with mocohub.from_pretrained({str(out)!r}, num_classes=None)")
    emit({**metrics, "model": args.model, "out": str(out), "precision": hw.precision, "seconds": seconds},
         human, args.json)
    return 0


def _extract(args: argparse.Namespace, hw: Hardware, start: float) -> int:
    from safetensors import safe_open

    from ..evaluation.extract import extract_embeddings
    from ..zoo.loading import from_pretrained

    if args.out is None and args.resume:
        raise MocohubError("--resume continues an interrupted run: pass its OUT file too")
    target = args.out or fresh_run_dir("extract", model_slug(args.model)) / "embeddings.safetensors"
    model = from_pretrained(args.model)
    out = extract_embeddings(model, args.image_dir, target, batch_size=args.batch_size, workers=args.workers,
                             device=hw.device, precision=hw.precision, channels_last=hw.channels_last,
                             normalize=args.normalize, shard_size=args.shard_size, overwrite=args.overwrite,
                             resume=args.resume, progress=not args.quiet, model_name=args.model)
    with safe_open(str(out), "pt") as f:  # shapes and metadata only: the file may be large
        num_images, dim = f.get_slice("embeddings").get_shape()
        failed = json.loads(f.metadata()["failed"])
    seconds = time.perf_counter() - start
    human = (f"{count(num_images)} embeddings ({dim}-d) of {args.image_dir} -> {out} ({duration(seconds)})"
             + _skipped(failed))
    emit({"command": "extract", "model": args.model, "out": str(out), "num_images": num_images, "dim": dim,
          "failed": failed, "precision": hw.precision, "seconds": seconds}, human, args.json)
    return 0


def _settings(row: dict[str, Any]) -> str:
    s = row["settings"]
    if row["protocol"] == "knn":
        return f"k {s['k']}, t {num(s['t'])}"
    if row["protocol"] == "fast":
        tried = len(s["weight_decays"])
        return f"L-BFGS, wd {num(s['weight_decay'])}" + (f" (best of {tried} on a 20 % hold-out)" if tried > 1 else "")
    steps = f" x0.1 at {', '.join(map(str, s['milestones']))}" if s["schedule"] == "step" else ""
    return f"SGD {s['epochs']} epochs, lr {num(s['lr'])}, batch {s['batch_size']}, {s['schedule']}{steps}"


def _eval(args: argparse.Namespace, hw: Hardware, start: float) -> int:
    from ..evaluation.protocols import evaluate_protocols
    from ..zoo.loading import from_pretrained

    model = from_pretrained(args.model)
    protocols = ["knn", "fast", *(args.protocol if args.official else [])]
    rows = evaluate_protocols(model, args.train, args.val, list(dict.fromkeys(protocols)), k=args.k, t=args.t,
                              weight_decays=args.fast_wd, epochs=args.epochs, batch_size=args.batch_size,
                              workers=args.workers, device=hw.device, precision=hw.precision,
                              channels_last=hw.channels_last, progress=not args.quiet)
    seconds = time.perf_counter() - start
    lines = [("protocol", "settings", "top-1", "top-5", "seconds")]
    lines += [(r["protocol"], _settings(r), pct(r["top1"]), pct(r["top5"]), duration(r["seconds"])) for r in rows]
    shared = rows[0]["settings"]  # kNN's: the feature pass it shares with the fast probe
    human = (table(lines) + f"\nkNN and fast scored one feature pass of {count(shared['num_train'])} train and "
             f"{count(shared['num_val'])} val images ({duration(shared['features_s'])}, not in their seconds); "
             f"{hw.precision}, {duration(seconds)} in all"
             + (f"\nskipped {shared['skipped']} undecodable image(s)" if shared["skipped"] else ""))
    emit({"command": "eval", "model": args.model, "results": rows, "precision": hw.precision, "seconds": seconds},
         human, args.json)
    return 0


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    commands = {"extract": _extract, "knn": _knn, "lincls": _lincls, "eval": _eval}
    return commands[args.command](args, _hardware(args), start)
