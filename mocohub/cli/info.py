"""``mocohub info MODEL``: what is known about a model, without downloading or loading it.

Zoo names are answered from the registry; local folders from their ``config.json`` (an export,
a ``lincls`` classifier) and, for a training run, its checkpoint's settings and ``metrics.jsonl``;
a checkpoint file as ``from_pretrained`` reads it. Checkpoint layouts are ``zoo/formats.py``'s to know.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Mapping

from ..errors import MocohubError
from ..jsonlog import read_jsonl
from ..run_folder import BACKBONE, CHECKPOINT, RunFolder
from ..zoo.registry import ALIASES, REGISTRY, model_info
from .output import add_json_flag, emit, num, params, pct

__all__ = ["add_parser", "run", "describe"]

KEYS = ("source", "kind", "name", "aliases", "architecture", "stem", "num_params", "num_features", "num_classes",
        "classes", "input_size", "crop_pct", "interpolation", "mean", "std", "moco_version", "recipe", "epochs",
        "dataset", "metrics", "license", "paper", "source_url", "weights_url", "hash", "run")
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# metric key -> how a person reads it
_METRICS = {"imagenet_linear_top1": "ImageNet linear top-1", "knn_top1": "kNN top-1", "knn_top5": "kNN top-5",
            "knn_top1_backbone": "kNN top-1 of the backbone features", "top1": "linear top-1", "top5": "linear top-5",
            "acc1": "instance accuracy"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what is known about a model: architecture, input, recipe, metrics, licence",
                       description="Describe a zoo model (from the registry, nothing is downloaded), an export "
                                   "folder, a training run folder or a checkpoint file (.pth.tar, .safetensors).")
    p.add_argument("model", metavar="MODEL", help="zoo name or alias, export folder, run folder or checkpoint file")
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
    return sum(math.prod(s) for k, s in shapes.items() if not k.endswith(_BUFFERS))


def _weights_params(folder: Path) -> int | None:
    from safetensors import SafetensorError, safe_open

    from ..zoo.pretrained import WEIGHTS_NAME
    try:
        with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
            return _count({k: f.get_slice(k).get_shape() for k in f.keys()})
    except (OSError, SafetensorError):
        return None


def _from_config(config: Mapping[str, Any], num_params: int | None) -> dict[str, Any]:
    """What an export's ``config.json`` (or a converted checkpoint's) says."""
    meta = dict(config.get("mocohub", {}))
    metrics = {k: meta[k] for k in _METRICS if k in meta}
    linear = meta.get("linear_eval") or {}
    metrics.update({k: linear[k] for k in ("top1", "top5") if k in linear})
    return {"kind": "export", "architecture": config.get("architecture"), "stem": meta.get("stem"),
            "num_params": num_params, "num_features": config.get("num_features"),
            "num_classes": config.get("num_classes", 0), "classes": meta.get("classes"),
            **_preprocessing(config.get("pretrained_cfg", {})), "moco_version": meta.get("moco_version"),
            "recipe": meta.get("recipe"), "epochs": meta.get("epochs"), "dataset": meta.get("dataset"),
            "metrics": metrics, "license": meta.get("license"), "paper": meta.get("paper"),
            "source_url": meta.get("source"), "weights_url": meta.get("url"), "hash": None}


def _export(folder: Path) -> dict[str, Any]:
    from ..zoo.pretrained import CONFIG_NAME
    return _from_config(json.loads((folder / CONFIG_NAME).read_text()), _weights_params(folder))


def _run(checkpoint: Path) -> dict[str, Any]:
    """A training run's checkpoint (either generation): its settings and progress, the last epoch's metrics."""
    from ..zoo.formats import backbone_weights, read_checkpoint, run_config
    state = read_checkpoint(checkpoint)
    settings = run_config(state)
    backbone = backbone_weights(state)
    rows = read_jsonl(RunFolder(checkpoint.parent).metrics) if checkpoint.name == CHECKPOINT else []
    last = rows[-1] if rows else {}
    return {"kind": "run", "architecture": settings.get("arch", state.get("arch")), "stem": settings.get("stem"),
            "num_params": _count({k: list(v.shape) for k, v in backbone.items()}) or None,
            "moco_version": settings.get("moco_version"), "recipe": settings.get("recipe"),
            "epochs": settings.get("epochs"), "dataset": settings.get("data"),
            "metrics": {k: last[k] for k in _METRICS if k in last},
            "run": {"epochs_done": int(state.get("epoch", 0)), "epochs_planned": settings.get("epochs"),
                    "settings": settings}}


def _checkpoint(file: Path) -> dict[str, Any]:
    """A checkpoint file, read as ``from_pretrained`` reads it (a training run's keeps its progress)."""
    from ..zoo.formats import convert, read_checkpoint, run_config
    state = read_checkpoint(file)
    if run_config(state):
        return _run(file)
    backbone = convert(state)
    return dict(_from_config(backbone.config, _count({k: list(v.shape) for k, v in backbone.state_dict.items()})),
                kind="checkpoint")


def _local(folder: Path) -> dict[str, Any]:
    from ..zoo.pretrained import CONFIG_NAME  # torch: a local file is read with it, a zoo name is not
    run = RunFolder(folder)
    info: dict[str, Any] = _run(run.checkpoint) if run.checkpoint.is_file() else {}
    export = next((d for d in (folder, run.backbone) if (d / CONFIG_NAME).is_file()), None)
    if export is not None:  # a finished run's export knows the parameters and input; the run knows more
        info = {**_export(export), **{k: v for k, v in info.items() if v not in (None, {}, "")}}
    if not info:
        raise MocohubError(f"{folder} holds no {CONFIG_NAME}, {BACKBONE}/ export or {CHECKPOINT}: "
                           "pass an export folder, a run folder, a checkpoint file or a zoo name (mocohub list)")
    return info


def describe(source: str) -> dict[str, Any]:
    """What ``mocohub info`` knows about ``source``: every key of ``KEYS``, None where unknown."""
    folder = Path(source).expanduser()
    if source in REGISTRY or source in ALIASES or not (folder.exists() or "/" in source):
        info = _zoo(source)  # an unknown name: the registry's error lists the valid ones
    elif folder.is_dir():
        info = _local(folder)
    elif folder.is_file():
        info = _checkpoint(folder)
    else:
        raise MocohubError(f"no such file or folder: {source} (info reads zoo names, folders and checkpoint files)")
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
