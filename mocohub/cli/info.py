"""``mocohub info MODEL``: what is known about a model, without downloading or loading it.

Zoo names are answered from the registry; local folders from their ``config.json`` (an export,
a ``lincls`` classifier) and, for a training run, its checkpoint's settings and ``metrics.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open

from ..errors import MocohubError
from ..jsonlog import METRICS_NAME, read_jsonl
from ..zoo.pretrained import CONFIG_NAME, RUN_CHECKPOINT, RUN_EXPORT, WEIGHTS_NAME
from ..zoo.registry import ALIASES, REGISTRY, model_info
from .output import add_json_flag, emit, num, params, pct

__all__ = ["add_parser", "run", "describe"]

KEYS = ("source", "kind", "name", "aliases", "architecture", "stem", "num_params", "num_features", "num_classes",
        "classes", "input_size", "crop_pct", "interpolation", "mean", "std", "moco_version", "recipe", "epochs",
        "dataset", "metrics", "license", "paper", "source_url", "weights_url", "hash", "run")
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# metric key -> how a person reads it
_METRICS = {"imagenet_linear_top1": "ImageNet linear top-1", "knn_top1": "kNN top-1", "knn_top5": "kNN top-5",
            "top1": "linear top-1", "top5": "linear top-5", "acc1": "instance accuracy"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what is known about a model: architecture, input, recipe, metrics, licence",
                       description="Describe a zoo model (from the registry, nothing is downloaded), an export "
                                   "folder or a training run folder.")
    p.add_argument("model", metavar="MODEL", help="zoo name or alias, export folder, or run folder")
    add_json_flag(p, ", ".join(KEYS) + " (null where unknown; run: epochs_done, epochs_planned, settings)")
    p.set_defaults(func=run)


def _preprocessing(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: cfg.get(k) for k in ("input_size", "crop_pct", "interpolation", "mean", "std")}


def _zoo(name: str) -> dict[str, Any]:
    m = model_info(name)
    return {"source": name, "kind": "zoo", "name": m["name"], "architecture": m["arch"],
            "num_params": m["num_params"], **_preprocessing(m["pretrained_cfg"]),
            "moco_version": m["moco_version"], "recipe": m["recipe"], "epochs": m["epochs"],
            "metrics": {"imagenet_linear_top1": m["imagenet_linear_top1"]}, "license": m["license"],
            "paper": m["paper"], "source_url": m["source"], "weights_url": m["url"], "hash": m["hash"],
            "aliases": [a for a, target in ALIASES.items() if target == m["name"]]}


def _count(shapes: Mapping[str, list[int]]) -> int:
    """Learned parameters (BN running statistics are buffers, not parameters)."""
    return sum(int(torch.Size(s).numel()) for k, s in shapes.items() if not k.endswith(_BUFFERS))


def _weights_params(folder: Path) -> int | None:
    try:
        with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
            return _count({k: f.get_slice(k).get_shape() for k in f.keys()})
    except (OSError, SafetensorError):
        return None


def _export(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / CONFIG_NAME).read_text())
    meta = dict(config.get("mocohub", {}))
    metrics = {k: meta[k] for k in _METRICS if k in meta}
    linear = meta.get("linear_eval") or {}
    metrics.update({k: linear[k] for k in ("top1", "top5") if k in linear})
    return {"kind": "export", "architecture": config.get("architecture"), "stem": meta.get("stem"),
            "num_params": _weights_params(folder), "num_features": config.get("num_features"),
            "num_classes": config.get("num_classes", 0), "classes": meta.get("classes"),
            **_preprocessing(config.get("pretrained_cfg", {})), "moco_version": meta.get("moco_version"),
            "recipe": meta.get("recipe"), "epochs": meta.get("epochs"), "dataset": meta.get("dataset"),
            "metrics": metrics, "license": meta.get("license"), "paper": meta.get("paper"),
            "source_url": meta.get("source"), "weights_url": meta.get("url"), "hash": None}


def _run(folder: Path) -> dict[str, Any]:
    """A training run: the checkpoint's settings and progress, the last epoch's metrics."""
    try:
        state = torch.load(folder / RUN_CHECKPOINT, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise MocohubError(f"cannot read {folder / RUN_CHECKPOINT}: {e}") from e
    settings = dict(state.get("mocohub", {}).get("config", {})) if isinstance(state.get("mocohub"), dict) else {}
    encoder = {k[len("module.encoder_q."):]: list(v.shape) for k, v in state.get("state_dict", {}).items()
               if k.startswith("module.encoder_q.") and not k.startswith("module.encoder_q.fc.")}
    rows = read_jsonl(folder / METRICS_NAME)
    last = rows[-1] if rows else {}
    return {"kind": "run", "architecture": settings.get("arch", state.get("arch")), "stem": settings.get("stem"),
            "num_params": _count(encoder) if encoder else None, "moco_version": settings.get("moco_version"),
            "recipe": settings.get("recipe"), "epochs": settings.get("epochs"), "dataset": settings.get("data"),
            "metrics": {k: last[k] for k in _METRICS if k in last},
            "run": {"epochs_done": int(state.get("epoch", 0)), "epochs_planned": settings.get("epochs"),
                    "settings": settings}}


def _local(folder: Path) -> dict[str, Any]:
    info: dict[str, Any] = _run(folder) if (folder / RUN_CHECKPOINT).is_file() else {}
    export = next((d for d in (folder, folder / RUN_EXPORT) if (d / CONFIG_NAME).is_file()), None)
    if export is not None:  # a finished run's export knows the parameters and input; the run knows more
        info = {**_export(export), **{k: v for k, v in info.items() if v not in (None, {}, "")}}
    if not info:
        raise MocohubError(f"{folder} holds no {CONFIG_NAME}, {RUN_EXPORT}/ export or {RUN_CHECKPOINT}: "
                           "pass an export folder, a run folder or a zoo name (mocohub list)")
    return info


def describe(source: str) -> dict[str, Any]:
    """What ``mocohub info`` knows about ``source``: every key of ``KEYS``, None where unknown."""
    folder = Path(source).expanduser()
    if source in REGISTRY or source in ALIASES or not (folder.exists() or "/" in source):
        info = _zoo(source)  # an unknown name: the registry's error lists the valid ones
    elif folder.is_dir():
        info = _local(folder)
    else:
        raise MocohubError(f"{source} is not a folder: info reads zoo names, export folders and run folders")
    info["source"] = source
    return {k: info.get(k) for k in KEYS}


def _input(info: Mapping[str, Any]) -> str | None:
    size = info.get("input_size")
    if not size:
        return None
    crop = info.get("crop_pct")
    resize = f"resize + center crop {crop:g}" if crop and crop < 1 else "resize"
    mean, std = (" ".join(f"{v:.3f}" for v in info.get(k) or ()) for k in ("mean", "std"))
    return f"{size[-2]} x {size[-1]} px, {resize}, {info.get('interpolation')}; mean {mean}, std {std}"


def _metrics(metrics: Mapping[str, Any]) -> str | None:
    return ", ".join(f"{_METRICS[k]} {pct(v)}" for k, v in metrics.items() if k in _METRICS) or None


def _recipe(info: Mapping[str, Any]) -> str | None:
    s = (info.get("run") or {}).get("settings")
    if s:
        head = "MLP" if s.get("mlp") else "linear"
        return (f"{s.get('recipe')} (MoCo {s.get('moco_version')}): batch {s.get('batch_size')}, lr {num(s['lr'])} "
                f"{s.get('schedule')}, K {s.get('moco_k')}, m {s.get('moco_m')}, T {s.get('moco_t')}, {head} head, "
                f"{s.get('image_size')} px")
    parts = [f"MoCo {info['moco_version']}" if info.get("moco_version") else None,
             f"{info['epochs']} epochs" if info.get("epochs") else None, info.get("recipe")]
    return ", ".join(str(p) for p in parts if p) or None


def _human(info: Mapping[str, Any]) -> str:
    title = info.get("name") or info["source"]
    aliases = f"; alias {', '.join(info['aliases'])}" if info.get("aliases") else ""
    arch = ", ".join(str(p) for p in (
        info.get("architecture"), f"{info['stem']} stem" if info.get("stem") == "cifar" else None,
        f"{params(info['num_params'])} parameters" if info.get("num_params") else None,
        f"{info['num_features']}-d features" if info.get("num_features") else None,
        f"{info['num_classes']} classes" if info.get("num_classes") else None) if p)
    run = info.get("run")
    progress = (f"{run['epochs_done']} of {run['epochs_planned']} epochs done"
                + (" (finished)" if run["epochs_done"] >= (run["epochs_planned"] or 0) else " (resumable)")
                if run else None)
    weights = info.get("weights_url")
    head = ", num_classes=None" if info.get("num_classes") else ""  # keep the classifier
    if weights and info.get("hash"):
        weights += f" ({info['hash']})"
    rows = [("architecture", arch), ("input", _input(info)), ("recipe", _recipe(info)), ("progress", progress),
            ("data", info.get("dataset")), ("metrics", _metrics(info.get("metrics") or {})),
            ("licence", info.get("license")), ("paper", info.get("paper")), ("source", info.get("source_url")),
            ("weights", weights), ("load", f"mocohub.from_pretrained({info['source']!r}{head})")]
    return "\n".join([f"{title} ({info['kind']}{aliases})"] + [f"  {k:<14}{v}" for k, v in rows if v])


def run(args: argparse.Namespace) -> int:
    info = describe(args.model)
    emit(info, _human(info), args.json)
    return 0
