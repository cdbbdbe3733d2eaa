"""``from_pretrained``: any MoCo checkpoint, from any of the doors, as a ready timm backbone."""
from __future__ import annotations

import copy
import urllib.parse
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
import torch.nn as nn

from ..backbones import apply_cifar_stem
from ..errors import MocohubError
from ..run_folder import RunFolder
from .download import cached_backbone, download
from .formats import Backbone, convert, read_checkpoint
from .hub import HUB_PREFIX, download_hub_repo
from .instantiate import build_loaded
from .pretrained import CONFIG_NAME, build_model, read_pretrained_dir
from .registry import ALIASES, REGISTRY, get_model
from .transforms import transform_for

__all__ = ["resolve_source", "from_pretrained", "zoo_model"]


def _local(path: Path) -> Backbone:
    if path.is_dir():
        run = RunFolder(path)
        if (run.backbone / CONFIG_NAME).is_file():
            path = run.backbone
        if (path / CONFIG_NAME).is_file():
            state_dict, config = read_pretrained_dir(path)
            return Backbone(state_dict, config, "mocohub-export")
        if not run.checkpoint.is_file():
            raise MocohubError(f"{path} holds no model: expected {CONFIG_NAME} + model.safetensors, "
                               f"a {run.backbone.name}/ export or a {run.checkpoint.name}")
        path = run.checkpoint
    return convert(read_checkpoint(path))


def resolve_source(source: str | Path, *, check_hash: str | None = None, progress: bool = True) -> Backbone:
    """Fetch and convert ``source``: a zoo name, ``hf-hub:org/repo[@rev]``, a URL, a file or a folder.

    ``check_hash`` (``"sha256:<hex>"`` or ``"md5:<hex>"``) verifies a download; zoo models bring
    their published hash.
    """
    text = str(source)
    if text.startswith(HUB_PREFIX):
        state_dict, config = read_pretrained_dir(download_hub_repo(text))
        return Backbone(state_dict, config, "hf-hub")
    if urllib.parse.urlparse(text).scheme in ("http", "https", "file"):
        return cached_backbone(download(text, expected_hash=check_hash, progress=progress))
    path = Path(text).expanduser()
    looks_local = path.exists() or "/" in text or "\\" in text or bool(path.suffix)
    if text in REGISTRY or text in ALIASES or not looks_local:  # zoo names win over local paths
        entry = get_model(text)  # an unknown name raises, listing the valid ones
        checkpoint = download(entry.url, expected_hash=check_hash or entry.hash, expected_size=entry.file_size,
                              progress=progress)
        backbone = cached_backbone(checkpoint, meta=entry.meta())
        backbone.config["pretrained_cfg"] = dict(entry.pretrained_cfg, num_classes=0)
        return backbone
    if not path.exists():
        raise MocohubError(f"no such file or folder: {text}")
    return _local(path)


def _features_model(config: dict[str, Any], state_dict: dict[str, torch.Tensor],
                    out_indices: Sequence[int] | None, **kwargs: Any) -> nn.Module:
    arch = config["architecture"]
    if out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices)

    def build() -> nn.Module:
        try:
            model = timm.create_model(arch, features_only=True, **config.get("model_args", {}), **kwargs)
        except (IndexError, AssertionError) as e:
            levels = len(build_model(config).feature_info)
            raise MocohubError(f"bad out_indices {out_indices} for {arch}: it has {levels} feature levels, "
                               f"valid indices are 0..{levels - 1} (or negative from the end)") from e
        return apply_cifar_stem(model) if config.get("mocohub", {}).get("stem") == "cifar" else model

    with torch.device("meta"):
        names = build().state_dict()
    # a features model keeps the backbone's names, under "model." for timm's getter wrapper (ViT)
    wanted = {}
    for key in names:
        source = key if key in state_dict else key.removeprefix("model.")
        if source in state_dict:
            wanted[key] = state_dict[source]
    model = build_loaded(build, wanted)
    model.pretrained_cfg = dict(config["pretrained_cfg"])
    return model


def from_pretrained(source: str | Path, *, features_only: bool = False,
                    out_indices: Sequence[int] | None = None, num_classes: int | None = 0,
                    check_hash: str | None = None, progress: bool = True, **kwargs: Any) -> nn.Module:
    """A pretrained MoCo backbone (eval mode) from any supported source.

    By default the model returns pooled features (ResNet-50: 2048-d). ``num_classes=N`` adds a
    classifier, loaded when the checkpoint has one of that size (linear-eval checkpoints), freshly
    initialised otherwise; ``num_classes=None`` keeps whatever classifier the checkpoint has.
    ``features_only=True`` returns timm's multi-scale feature extractor. ``kwargs`` go to timm.
    The model carries ``pretrained_cfg``, ``mocohub_config`` and ``eval_transform``.
    """
    backbone = resolve_source(source, check_hash=check_hash, progress=progress)
    config = copy.deepcopy(backbone.config)
    classifier = config["pretrained_cfg"].get("classifier", "fc")
    have = config.get("num_classes", 0)
    want = have if num_classes is None else num_classes
    state_dict = backbone.state_dict
    if want != have:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(f"{classifier}.")}
    config["num_classes"] = config["pretrained_cfg"]["num_classes"] = want
    if features_only:
        model = _features_model(config, state_dict, out_indices, **kwargs)
    else:
        model = build_loaded(lambda: build_model(config, **kwargs), state_dict,
                             fresh=classifier if want != have else None)
    model.mocohub_config = config
    model.eval_transform = transform_for(model)
    return model.eval()


def zoo_model(name: str, pretrained: bool = True, **kwargs: Any) -> nn.Module:
    """A zoo architecture, with its MoCo weights or (``pretrained=False``) randomly initialised."""
    if pretrained:
        return from_pretrained(name, **kwargs)
    entry = get_model(name)
    model = timm.create_model(entry.arch, pretrained=False, **{"num_classes": 0, **entry.model_args, **kwargs})
    model.pretrained_cfg = dict(entry.pretrained_cfg, num_classes=getattr(model, "num_classes", 0))
    return model
