"""The registry of official MoCo checkpoints: every fact about a zoo model lives here, once.

In the spirit of torchvision's ``Weights(url, transforms, meta)``: the CLI table, ``hubconf.py``,
the model card and the downloader all read these entries instead of repeating them.
"""
from __future__ import annotations

import difflib
import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import MocohubError
from .names import IMAGENET_PRETRAINED_CFG

__all__ = ["ZooModel", "ZOO_URL_ENV", "DEFAULT_ZOO_URL", "REGISTRY", "ALIASES",
           "list_models", "model_info", "get_model"]

ZOO_URL_ENV = "MOCOHUB_ZOO_URL"
DEFAULT_ZOO_URL = "https://dl.fbaipublicfiles.com"

_PAPERS = {
    "v1": "He, Fan, Wu, Xie, Girshick. Momentum Contrast for Unsupervised Visual Representation "
          "Learning. CVPR 2020. arXiv:1911.05722",
    "v2": "Chen, Fan, Girshick, He. Improved Baselines with Momentum Contrastive Learning. "
          "arXiv:2003.04297",
    "v3": "Chen, Xie, He. An Empirical Study of Training Self-Supervised Vision Transformers. "
          "ICCV 2021. arXiv:2104.02057",
}
_LICENSES = {"v1": "mit", "v2": "mit", "v3": "cc-by-nc-4.0"}
_REPOS = {"v1": "facebookresearch/moco", "v2": "facebookresearch/moco", "v3": "facebookresearch/moco-v3"}
_VIT_CFG = dict(IMAGENET_PRETRAINED_CFG, first_conv="patch_embed.proj", classifier="head")


@dataclass(frozen=True)
class ZooModel:
    """One official pre-training checkpoint and what is known about it."""

    name: str
    path: str  # relative to the zoo base URL
    arch: str  # a timm architecture name
    moco_version: str
    epochs: int
    top1: float  # ImageNet linear-evaluation top-1 (%)
    recipe: str
    num_params: int  # backbone parameters, without any head
    hash: str | None = None  # "md5:<prefix>" or "sha256:<prefix>"; None where none is published
    # Bytes, checked on download where known. None everywhere so far: the sizes are not published
    # (REFERENCE.md section 3) and could not be measured without network access.
    file_size: int | None = None
    model_args: Mapping[str, Any] = field(default_factory=dict)
    pretrained_cfg: Mapping[str, Any] = field(default_factory=lambda: dict(IMAGENET_PRETRAINED_CFG))

    @property
    def url(self) -> str:
        """The download URL; ``$MOCOHUB_ZOO_URL`` replaces the base (mirrors, tests)."""
        base = os.environ.get(ZOO_URL_ENV) or DEFAULT_ZOO_URL
        return f"{base.rstrip('/')}/{self.path}"

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def hub_name(self) -> str:
        """The ``hubconf.py`` entrypoint name, e.g. ``moco_v2_800ep``."""
        return self.name.replace("-r50", "").replace("-", "_")

    @property
    def license(self) -> str:
        return _LICENSES[self.moco_version]

    @property
    def paper(self) -> str:
        return _PAPERS[self.moco_version]

    @property
    def source_repo(self) -> str:
        return f"https://github.com/{_REPOS[self.moco_version]}"

    def describe(self) -> str:
        """A docstring-sized summary (``hubconf.py`` entrypoints, ``mocohub list -v``)."""
        verify = f"verified by {self.hash}" if self.hash else "no hash published: pass check_hash to verify"
        return (f"MoCo {self.moco_version} {self.arch}, {self.epochs} epochs on ImageNet-1k "
                f"({self.num_params / 1e6:.1f}M backbone parameters); ImageNet linear top-1 {self.top1}%.\n\n"
                f"Recipe: {self.recipe}.\nWeights: {self.url} ({verify}).\nLicence: {self.license}. "
                f"Paper: {self.paper}.\n\nReturns a timm model giving pooled features by default; "
                "kwargs go to mocohub.from_pretrained (features_only, out_indices, num_classes, ...).")

    def meta(self) -> dict[str, Any]:
        """Plain facts for a model card or ``config.json`` (``mocohub`` section)."""
        return {"zoo_name": self.name, "moco_version": self.moco_version, "epochs": self.epochs,
                "recipe": self.recipe, "imagenet_linear_top1": self.top1, "license": self.license,
                "paper": self.paper, "source": self.source_repo, "url": f"{DEFAULT_ZOO_URL}/{self.path}"}


def _v12(version: str, epochs: int, top1: float, md5: str, recipe: str) -> ZooModel:
    stem = f"moco_{version}_{epochs}ep"
    return ZooModel(f"moco-{version}-r50-{epochs}ep", f"moco/moco_checkpoints/{stem}/{stem}_pretrain.pth.tar",
                    "resnet50", version, epochs, top1, recipe, 23_508_032, hash=f"md5:{md5}")


def _v3_resnet(epochs: int, top1: float, recipe: str) -> ZooModel:
    tag = f"r-50-{epochs}ep"
    return ZooModel(f"moco-v3-r50-{epochs}ep", f"moco-v3/{tag}/{tag}.pth.tar", "resnet50", "v3", epochs,
                    top1, recipe, 23_508_032)


def _v3_vit(size: str, arch: str, top1: float, num_params: int, model_args: Mapping[str, Any]) -> ZooModel:
    tag = f"vit-{size}-300ep"
    return ZooModel(f"moco-v3-{tag}", f"moco-v3/{tag}/{tag}.pth.tar", arch, "v3", 300, top1,
                    "AdamW lr 1.5e-4 wd 0.1, batch 4096, warmup 40, frozen patch projection, m-cos 0.99, T 0.2",
                    num_params, model_args=model_args, pretrained_cfg=_VIT_CFG)


_SGD = "SGD lr 0.03 momentum 0.9 wd 1e-4, batch 256, K 65536, m 0.999"
REGISTRY: dict[str, ZooModel] = {m.name: m for m in (
    _v12("v1", 200, 60.6, "b251726a", f"{_SGD}, T 0.07, linear head, lr x0.1 at 120/160"),
    _v12("v2", 200, 67.7, "59fd9945", f"{_SGD}, T 0.2, MLP head, aug+, cosine lr"),
    _v12("v2", 800, 71.1, "a04e12f8", f"{_SGD}, T 0.2, MLP head, aug+, cosine lr"),
    _v3_resnet(100, 68.9, "LARS lr 0.6 wd 1e-6, batch 4096, m-cos 0.99, crop-min 0.2"),
    _v3_resnet(300, 72.8, "LARS lr 0.3 wd 1e-6, batch 4096, m-cos 0.99, crop-min 0.2"),
    _v3_resnet(1000, 74.6, "LARS lr 0.3 wd 1.5e-6, batch 4096, m-cos 0.996, crop-min 0.2"),
    # MoCo v3's ViT-S has 12 heads where timm's vit_small has 6.
    _v3_vit("s", "vit_small_patch16_224", 73.2, 21_665_664, {"num_heads": 12}),
    _v3_vit("b", "vit_base_patch16_224", 76.7, 85_798_656, {}),
)}
ALIASES: dict[str, str] = {"moco-r50": "moco-v2-r50-800ep", "moco-v3-r50": "moco-v3-r50-1000ep"}


def list_models(pattern: str | None = None, *, aliases: bool = False) -> list[str]:
    """Zoo model names, optionally filtered by a shell-style ``pattern`` (e.g. ``"*v3*"``); a pattern
    that matches an alias (``"moco-r50"``) finds the model it names."""
    def matches(name: str) -> bool:
        return pattern is None or fnmatch.fnmatch(name, pattern)

    names = [n for n in REGISTRY if matches(n) or any(matches(a) for a, target in ALIASES.items() if target == n)]
    return names + [a for a in ALIASES if aliases and matches(a)]


def get_model(name: str) -> ZooModel:
    """The registry entry for a name or alias; a wrong name lists the valid ones."""
    entry = REGISTRY.get(ALIASES.get(name, name))
    if entry is None:
        valid = list_models(aliases=True)
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise MocohubError(f"unknown model {name!r}.{hint} Valid names: {', '.join(valid)}")
    return entry


def model_info(name: str) -> dict[str, Any]:
    """Everything the registry knows about a model, as a plain dict."""
    entry = get_model(name)
    return {"name": entry.name, "arch": entry.arch, "model_args": dict(entry.model_args),
            "hash": entry.hash, "file_size": entry.file_size, "num_params": entry.num_params,
            "pretrained_cfg": dict(entry.pretrained_cfg), **entry.meta()}
