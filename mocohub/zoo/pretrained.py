"""The mocohub export format: ``model.safetensors`` + ``config.json`` in timm's Hub schema.

One folder layout serves the trainer's export, ``save_pretrained``, the Hugging Face Hub and
``timm.create_model("hf-hub:...")``. mocohub-only facts (stem, MoCo version, provenance) live under
the ``"mocohub"`` key, which timm ignores.
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Mapping

import timm
import torch
import torch.nn as nn
from timm.models import FeatureInfo
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..backbones import RESNET_ARCHS, create_resnet
from ..data.augment import IMAGENET_MEAN, IMAGENET_STD
from ..errors import MocohubError
from ..fileio import atomic_write
from ..run_folder import CHECKPOINT
from .card import CARD_NAME, model_card
from .instantiate import build_loaded
from .names import CONFIG_NAME, IMAGENET_PRETRAINED_CFG, WEIGHTS_NAME

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "IMAGENET_PRETRAINED_CFG", "pretrained_cfg_for",
    "public_meta", "build_config", "build_model", "write_pretrained", "add_facts", "save_pretrained",
    "read_pretrained_dir", "load_pretrained_dir",
]


def pretrained_cfg_for(image_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict[str, Any]:
    """Eval preprocessing for a model trained on ``image_size`` crops (small images: no crop)."""
    cfg = dict(IMAGENET_PRETRAINED_CFG, mean=list(mean), std=list(std))
    cfg["input_size"] = [3, image_size, image_size]
    if image_size < 224:
        cfg["crop_pct"] = 1.0
    return cfg


# Run settings that name places on the training machine: the dataset folders keep only their
# name, the run's own files are dropped; an export is published and must not carry local paths.
_FOLDER_KEYS = ("data", "dataset", "val")
_LOCAL_ONLY_KEYS = ("out", "resume")


def _is_local_path(value: str) -> bool:
    return value.startswith("~") or PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute()


def public_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``meta`` without local paths: folder names instead of paths, no output or resume file."""
    public = {}
    for key, value in meta.items():
        if key in _LOCAL_ONLY_KEYS:
            continue
        if isinstance(value, str) and value and (key in _FOLDER_KEYS or _is_local_path(value)):
            value = PureWindowsPath(value.rstrip("/\\")).name  # splits on both separators
        public[key] = value
    return public


def build_config(arch: str, *, num_features: int, num_classes: int = 0, stem: str = "imagenet",
                 pretrained_cfg: Mapping[str, Any] | None = None,
                 meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A ``config.json`` dict that both timm and mocohub read; ``meta`` loses its local paths."""
    cfg = dict(pretrained_cfg or IMAGENET_PRETRAINED_CFG)
    cfg["num_classes"] = num_classes
    return {
        "architecture": arch,
        "num_classes": num_classes,
        "num_features": num_features,
        "global_pool": "avg",
        "model_args": {},
        "pretrained_cfg": cfg,
        "mocohub": {"stem": stem, **public_meta(meta or {})},
    }


def build_model(config: Mapping[str, Any], **kwargs: Any) -> nn.Module:
    """An untrained model shaped as ``config`` says, carrying its pretrained_cfg and config.

    ``kwargs`` go to timm on top of ``model_args`` (e.g. ``drop_path_rate``).
    """
    arch, num_classes = config["architecture"], config.get("num_classes", 0)
    model_args = {**config.get("model_args", {}), **kwargs}
    if arch in RESNET_ARCHS:
        model = create_resnet(arch, num_classes=num_classes,
                              stem=config.get("mocohub", {}).get("stem", "imagenet"), **model_args)
    else:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **model_args)
    model.pretrained_cfg = dict(config.get("pretrained_cfg", IMAGENET_PRETRAINED_CFG))
    model.mocohub_config = dict(config)
    return model


def write_pretrained(save_dir: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
                     config: Mapping[str, Any], *, repo_id: str | None = None) -> Path:
    """Write weights, config and model card atomically (a crash never leaves a half-written file).

    Local paths in the config's ``mocohub`` section are not written (``public_meta``).
    The weights go first, so a folder whose ``config.json`` exists has its weights too.
    """
    out = Path(save_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _write_config(out, config, repo_id)
    return out


def _write_config(out: Path, config: Mapping[str, Any], repo_id: str | None) -> None:
    """config.json (without local paths, also an older export's) and the card that explains it."""
    config = {**config, "mocohub": public_meta(config.get("mocohub", {}))}
    text = json.dumps(dict(config), indent=2) + "\n"
    card = model_card(config, repo_id=repo_id)
    atomic_write(out / CARD_NAME, lambda p: Path(p).write_text(card))
    atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(text))


def add_facts(folder: str | os.PathLike, **facts: Any) -> None:
    """Record facts measured after the export (e.g. ``mocohub demo``'s kNN score of the backbone) in its
    ``config.json`` and model card; the weights stay as they are."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["mocohub"] = {**config.get("mocohub", {}), **facts}
    _write_config(folder, config, None)


def save_pretrained(model: nn.Module, save_dir: str | os.PathLike,
                    config: Mapping[str, Any] | None = None, *, repo_id: str | None = None) -> Path:
    """Save a backbone built by mocohub; ``config`` defaults to the one it carries."""
    config = dict(config or getattr(model, "mocohub_config", None) or {})
    if not config:
        raise MocohubError("the model carries no mocohub config: pass config=build_config(...)")
    if isinstance(getattr(model, "feature_info", None), FeatureInfo):
        raise MocohubError("a features_only model cannot be saved as a backbone (its weights lack the "
                           "pooled model's layout): save the model from_pretrained(...) returns without "
                           "features_only, then load it with features_only=True")
    config["num_classes"] = getattr(model, "num_classes", config.get("num_classes", 0))
    config["pretrained_cfg"] = dict(getattr(model, "pretrained_cfg", config.get("pretrained_cfg", {})),
                                    num_classes=config["num_classes"])
    return write_pretrained(save_dir, model.state_dict(), config, repo_id=repo_id)


def read_pretrained_dir(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and config of a folder written by ``write_pretrained``."""
    folder = Path(path)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{folder} is not a mocohub model folder: {f.name} is missing")
    try:
        return load_file(weights_file), json.loads(config_file.read_text())
    except (SafetensorError, ValueError, OSError) as e:  # cut short by a copy, a download or a full disk
        bad = config_file if isinstance(e, ValueError) else weights_file  # (SafetensorError is no ValueError)
        raise MocohubError(f"{bad} is damaged ({e}): copy the folder again, or write it anew from its checkpoint "
                           f"with `mocohub convert CHECKPOINT {folder}` (a run's: RUN_DIR/{CHECKPOINT})") from e


def load_pretrained_dir(path: str | os.PathLike) -> nn.Module:
    """Load a folder written by ``write_pretrained``; every weight must fit (strict)."""
    state_dict, config = read_pretrained_dir(path)
    return build_loaded(lambda: build_model(config), state_dict).eval()
