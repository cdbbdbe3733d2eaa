"""The one place that knows every checkpoint layout and turns it into a backbone state dict.

Recognised (after dropping DataParallel's ``module.`` prefix):
  * MoCo v1/v2 pre-training (``encoder_q.*``, maybe ``encoder_k.*``/``queue``): ``encoder_q`` minus fc,
    exactly the official linear-evaluation rule; mocohub training checkpoints share this layout and
    add a ``"mocohub"`` section with the run config;
  * MoCo v3 pre-training (``base_encoder.*``, ``momentum_encoder.*``, ``predictor.*``): ``base_encoder``
    minus its projector (ResNet ``fc``, ViT ``head``);
  * linear-evaluation checkpoints and plain torchvision/timm state dicts: kept whole, with the
    classifier when it is a single linear layer.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..backbones import RESNET_ARCHS, resnet_architecture, vit_architecture, vit_args
from ..data.augment import AUGMENTATIONS
from ..errors import MocohubError
from .pretrained import IMAGENET_PRETRAINED_CFG, build_config, pretrained_cfg_for

__all__ = ["Backbone", "read_checkpoint", "detect_format", "pretraining_format", "backbone_weights", "run_config",
           "convert", "infer_resnet_arch"]

StateDict = dict[str, torch.Tensor]

# the query encoder of a pre-training checkpoint -> its format name
_ENCODERS = {"encoder_q.": "moco-v1/v2", "base_encoder.": "moco-v3"}
# (block type, blocks per stage, bottleneck width of layer1, groups, pooled features) -> mocohub name
_RESNETS = {
    ("basic", (2, 2, 2, 2), 64, 1, 512): "resnet18",
    ("basic", (3, 4, 6, 3), 64, 1, 512): "resnet34",
    ("bottleneck", (3, 4, 6, 3), 64, 1, 2048): "resnet50",
    ("bottleneck", (3, 4, 23, 3), 64, 1, 2048): "resnet101",
    ("bottleneck", (3, 8, 36, 3), 64, 1, 2048): "resnet152",
    ("bottleneck", (3, 4, 6, 3), 128, 1, 2048): "wide_resnet50_2",
    ("bottleneck", (3, 4, 23, 3), 128, 1, 2048): "wide_resnet101_2",
    ("bottleneck", (3, 4, 6, 3), 128, 32, 2048): "resnext50_32x4d",
    ("bottleneck", (3, 4, 23, 3), 256, 32, 2048): "resnext101_32x8d",
    ("basic", (1, 1, 1, 1), 64, 1, 512): "resnet10t",
    ("basic", (1, 1, 1, 1), 32, 1, 96): "test_resnet",
    ("basic", (1, 1, 1, 1), 32, 1, 256): "resnet10t_half",
}
_VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large"}
_CONVERT_HINT = ("Load it yourself in an environment you trust, then re-save only the weights: "
                 "torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pth'); "
                 "then `mocohub convert weights.pth OUT_DIR` gives a safetensors export.")


@dataclass
class Backbone:
    """Backbone weights plus the ``config.json`` that rebuilds their model.

    ``config["num_classes"]`` is the size of the classifier kept in ``state_dict`` (0: none).
    """

    state_dict: StateDict
    config: dict[str, Any]
    format: str


def _is_safetensors(path: Path) -> bool:
    """By content, not name (a download is checked under a temporary name): an 8-byte header length, then JSON."""
    try:
        with open(path, "rb") as f:
            return f.read(9)[8:] == b"{"
    except OSError as e:
        raise MocohubError(f"cannot read {path}: {e}") from e


def read_checkpoint(path: str | Path) -> Mapping[str, Any]:
    """Read a safetensors file or a torch checkpoint, never running pickled code."""
    path = Path(path)
    if _is_safetensors(path):
        try:
            return load_file(path)
        except SafetensorError as e:
            raise MocohubError(f"{path} is not a readable safetensors file ({e})") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
        if not unsafe:
            raise MocohubError(f"{path} is not a readable torch checkpoint ({type(e).__name__})") from e
        raise MocohubError(
            f"{path} needs more than tensors and plain containers to unpickle ({unsafe[0]}), and mocohub "
            f"loads with weights_only=True so that a checkpoint cannot run code. {_CONVERT_HINT}") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise MocohubError(f"{path} is not a readable torch checkpoint ({e})") from e


def _state_dict_of(obj: Mapping[str, Any]) -> StateDict:
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise MocohubError(f"no weights found in the checkpoint (top-level keys: {', '.join(map(str, obj))})")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def pretraining_format(obj: Mapping[str, Any]) -> str | None:
    """``moco-v1/v2`` or ``moco-v3`` for a pre-training checkpoint (official or a mocohub run's), else None."""
    prefix = _encoder_prefix(_state_dict_of(obj))
    return None if prefix is None else _ENCODERS[prefix]


def detect_format(obj: Mapping[str, Any]) -> str:
    """A short name for the checkpoint layout: moco-v1/v2, moco-v3, mocohub-checkpoint, state-dict."""
    name = pretraining_format(obj)
    if name is not None:
        return "mocohub-checkpoint" if isinstance(obj.get("mocohub"), Mapping) else name
    return "linear-eval" if "best_acc1" in obj else "state-dict"


def infer_resnet_arch(sd: Mapping[str, torch.Tensor]) -> str:
    """The ResNet name (RESNET_ARCHS) whose layout matches ``sd``."""
    blocks = tuple(len({m.group(1) for k in sd if (m := re.match(rf"layer{i}\.(\d+)\.conv1\.weight$", k))})
                   for i in range(1, 5))
    kind = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    conv2 = sd["layer1.0.conv2.weight"]
    key = (kind, blocks, conv2.shape[0], conv2.shape[0] // conv2.shape[1], _num_features(sd))
    if key not in _RESNETS:
        raise MocohubError(f"unsupported ResNet layout {key}; supported: {', '.join(RESNET_ARCHS)}")
    return _RESNETS[key]


def _infer_vit_arch(sd: Mapping[str, torch.Tensor], moco_v3: bool) -> tuple[str, dict[str, Any]]:
    dim = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    arch = f"vit_{_VIT_SIZES.get(dim, dim)}_patch{patch}_224"
    if arch not in timm.list_models(arch):
        raise MocohubError(f"unsupported ViT layout (embed dim {dim}, patch {patch}): no timm model {arch}")
    # MoCo v3's ViTs all use 12 heads (timm's vit_small has 6); a plain state dict cannot tell.
    return arch, ({"num_heads": 12} if moco_v3 else {})


def _split_classifier(sd: StateDict, name: str) -> tuple[StateDict, int]:
    """Keep a single linear classifier; drop anything else under ``name`` (a projection head)."""
    head = {k for k in sd if k.startswith(f"{name}.")}
    is_linear = head == {f"{name}.weight", f"{name}.bias"} and sd[f"{name}.weight"].ndim == 2
    kept = {k: v for k, v in sd.items() if is_linear or k not in head}
    return kept, (sd[f"{name}.weight"].shape[0] if is_linear else 0)


def _plain(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def _encoder_prefix(sd: Mapping[str, torch.Tensor]) -> str | None:
    """The query encoder's prefix in a pre-training checkpoint; None for any other layout."""
    return next((p for p in _ENCODERS if any(k.startswith(p) for k in sd)), None)


def _classifier_name(sd: Mapping[str, torch.Tensor]) -> str:
    """Where the model keeps its classifier (or, in a pre-training checkpoint, its projector)."""
    return "head" if "cls_token" in sd else "fc"


def backbone_weights(obj: Mapping[str, Any]) -> StateDict:
    """The backbone's weights: a pre-training checkpoint's query encoder without its projector
    (v1/v2 ``encoder_q`` minus fc, v3 ``base_encoder`` minus fc/head), any other layout whole."""
    sd = _state_dict_of(obj)
    prefix = _encoder_prefix(sd)
    if prefix is None:
        return sd
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    projector = f"{_classifier_name(sd)}."
    return {k: v for k, v in sd.items() if not k.startswith(projector)}


def run_config(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a mocohub training checkpoint carries (``{}`` for any other checkpoint)."""
    section = obj.get("mocohub")
    return dict(section.get("config", {})) if isinstance(section, Mapping) else {}


def convert(obj: Mapping[str, Any], *, meta: Mapping[str, Any] | None = None) -> Backbone:
    """Turn any recognised checkpoint object into a backbone state dict and its config."""
    fmt = detect_format(obj)
    prefix = _encoder_prefix(_state_dict_of(obj))
    sd, settings = backbone_weights(obj), run_config(obj)
    info: dict[str, Any] = {"converted_from": fmt}
    if prefix == "encoder_q.":  # the projector tells the generation: v2's is an MLP
        head = _state_dict_of(obj)
        info["moco_version"] = "v2" if "encoder_q.fc.0.weight" in head else "v1" if "encoder_q.fc.weight" in head else None
    elif prefix == "base_encoder.":
        info["moco_version"] = "v3"
    if isinstance(obj.get("epoch"), int):
        info["epochs"] = obj["epoch"]
    info.update({k: v for k, v in settings.items() if _plain(v)})
    info.update(meta or {})

    if ("conv1.weight" in sd or "conv1.0.weight" in sd) and "layer1.0.conv2.weight" in sd:
        (arch, model_args), classifier = resnet_architecture(infer_resnet_arch(sd)), "fc"
        stem = "cifar" if "conv1.weight" in sd and sd["conv1.weight"].shape[-1] == 3 else "imagenet"
        pcfg = dict(IMAGENET_PRETRAINED_CFG)
    elif "cls_token" in sd and "blocks.0.attn.qkv.weight" in sd:
        # MoCo v3 names its ViTs "vit_small"/"vit_base", in its linear-eval checkpoints too
        moco_v3 = prefix == "base_encoder." or obj.get("arch") in ("vit_small", "vit_base")
        if moco_v3 and settings.get("moco_version") == "v3":  # a mocohub run: its ViT at its training grid
            arch, model_args = vit_architecture(settings["arch"], **vit_args(int(settings["image_size"]),
                                                                             settings.get("patch_size")))
        else:
            arch, model_args = _infer_vit_arch(sd, moco_v3)
        classifier, stem = "head", "imagenet"
        pcfg = dict(IMAGENET_PRETRAINED_CFG, first_conv="patch_embed.proj", classifier="head")
    else:
        sample = ", ".join(list(sd)[:5])
        raise MocohubError(f"unrecognised checkpoint layout (format {fmt}; first keys: {sample}); "
                           "mocohub reads MoCo v1/v2/v3 checkpoints and ResNet/ViT state dicts")
    sd, num_classes = _split_classifier(sd, classifier)
    if "image_size" in settings:  # a mocohub run: normalised as its augmentation recipe was
        mean, std = AUGMENTATIONS[settings["aug"]][2] if settings.get("aug") in AUGMENTATIONS \
            else (pcfg["mean"], pcfg["std"])
        pcfg = dict(pretrained_cfg_for(int(settings["image_size"]), mean, std), first_conv=pcfg["first_conv"],
                    classifier=classifier)
    config = build_config(arch, num_features=_num_features(sd),
                          num_classes=num_classes, stem=stem, pretrained_cfg=pcfg, meta=info)
    config["model_args"] = model_args
    return Backbone(sd, config, fmt)


def _num_features(sd: Mapping[str, torch.Tensor]) -> int:
    """Width of the pooled features: the ViT embedding or the last ResNet block's output."""
    if "cls_token" in sd:
        return sd["cls_token"].shape[-1]
    last = max(k for k in sd if re.match(r"layer4\.\d+\.bn\d\.weight$", k))
    return sd[last].shape[0]
