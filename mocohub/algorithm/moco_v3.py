"""MoCo v3: no queue; the other view's keys in the (all-gathered) batch are the negatives.

Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021.
Query path: backbone -> projector -> predictor; key path: the momentum encoder (backbone ->
projector), updated with the momentum ``m`` given at each step. Module names follow the official
``moco/builder.py``, so its pre-training state dicts load strictly.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones import RESNET_ARCHS, create_resnet, create_vit, resnet_architecture, vit_architecture
from ..errors import MocohubError
from .distributed import concat_all_gather, rank
from .momentum import momentum_update_

__all__ = ["MoCoV3", "build_mlp"]


def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    """Linear(no bias)-BN-ReLU hidden layers, then Linear(no bias) and, with ``last_bn``, a BN without
    affine parameters (SimCLR's design, minus gamma)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        dim_in = input_dim if i == 0 else mlp_dim
        dim_out = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(dim_in, dim_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*layers)


def _projector_name(encoder: nn.Module) -> str:
    """``fc`` for a ResNet, ``head`` for a ViT: the classifier the projector replaces."""
    for name in ("fc", "head"):
        if hasattr(encoder, name):
            return name
    raise MocohubError("a backbone module needs an `fc` (ResNet) or `head` (ViT) classifier layer")


def _features(encoder: nn.Module, name: str) -> int:
    layer = getattr(encoder, name)
    features = layer.in_features if isinstance(layer, nn.Linear) else getattr(encoder, "num_features", None)
    if features is None:
        raise MocohubError(f"cannot tell the feature width: `{name}` is neither nn.Linear nor paired with "
                           "a `num_features` attribute")
    return features


class MoCoV3(nn.Module):
    """``loss = moco(x1, x2, m)``: the symmetrised contrastive loss of two views.

    Args:
        backbone: a ResNet name, ``vit_small``/``vit_base`` (MoCo v3's ViTs), a timm ViT name, or a
            module with an ``fc`` (ResNet) or ``head`` (ViT) layer.
        dim: output dimension of projector and predictor; mlp_dim: their hidden width;
        T: softmax temperature (official: 1.0 ResNet, 0.2 ViT).
        stem: "cifar" for a ResNet with a 3x3 stride-1 stem (small images).
        stop_grad_conv1: freeze the ViT's random patch projection (the official ViT recipe).
        backbone_args: go to timm for a named backbone (e.g. ``img_size=32, patch_size=4``).
    """

    # The official code converts the whole model (backbone BN and the MLPs' BN1d) to SyncBatchNorm
    # under DDP; torch's SyncBatchNorm needs GPU tensors.
    sync_bn = True

    def __init__(self, backbone: str | nn.Module = "resnet50", dim: int = 256, mlp_dim: int = 4096,
                 T: float = 1.0, *, stem: str = "imagenet", stop_grad_conv1: bool = False, **backbone_args: Any):
        super().__init__()
        self.T = T
        self.arch = backbone if isinstance(backbone, str) else None
        self.stem, self.backbone_args = stem, backbone_args
        if isinstance(backbone, str) and backbone in RESNET_ARCHS:  # official: zero_init_residual=True
            encoder = create_resnet(backbone, stem=stem, zero_init_residual=True, **backbone_args)
        elif isinstance(backbone, str):
            if stem != "imagenet":
                raise MocohubError(f"stem={stem!r} applies to ResNets; a ViT's stem is its patch size")
            encoder = create_vit(backbone, stop_grad_conv1=stop_grad_conv1, **backbone_args)
        else:
            if backbone_args or stop_grad_conv1:
                raise MocohubError("backbone_args and stop_grad_conv1 apply to a named backbone; "
                                   "give a module its options when you build it")
            encoder = backbone
        self.projector_name = _projector_name(encoder)
        self.num_features = _features(encoder, self.projector_name)
        vit = self.projector_name == "head"
        # ResNet: 2-layer projector and a predictor without last BN; ViT: 3 layers, and a last BN in both
        setattr(encoder, self.projector_name, build_mlp(3 if vit else 2, self.num_features, mlp_dim, dim))
        self.base_encoder = encoder
        self.momentum_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=vit)

    @torch.no_grad()
    def _update_momentum_encoder(self, m: float) -> None:
        momentum_update_(list(self.momentum_encoder.parameters()), list(self.base_encoder.parameters()), m)

    def features(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``encoder``'s pooled backbone features before its projector (timm's pre-logits): the
        representation a micro-batched step caches (``training.microbatch``)."""
        return encoder.forward_head(encoder.forward_features(x), pre_logits=True)

    def project(self, encoder: nn.Module, features: torch.Tensor) -> torch.Tensor:
        """``encoder``'s projector on its ``features``: ``project(e, features(e, x)) == e(x)``."""
        return getattr(encoder, self.projector_name)(features)

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """InfoNCE of this rank's queries against every rank's keys; the positive of query n on rank r
        is key N*r + n. Scaled by 2T, as the official code. Returns loss, logits and labels."""
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):  # the logits in fp32, not bf16/fp16
            q = F.normalize(q.to(dtype), dim=1)
            k = concat_all_gather(F.normalize(k.to(dtype), dim=1))
            logits = q @ k.t() / self.T
            labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank()
            return F.cross_entropy(logits, labels) * (2 * self.T), logits, labels

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float, *,
                return_loss: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss ctr(q1, k2) + ctr(q2, k1); the momentum encoder is updated with ``m`` before the
        keys are computed. ``return_loss``: ``(loss, logits, labels)`` with both terms' logits and
        labels stacked, the triple ``MoCo`` returns too (for an accuracy monitor)."""
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self._update_momentum_encoder(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        loss_12, logits_12, labels = self.contrastive_loss(q1, k2)
        loss_21, logits_21, _ = self.contrastive_loss(q2, k1)
        loss = loss_12 + loss_21
        if return_loss:
            return loss, torch.cat([logits_12, logits_21]), torch.cat([labels, labels])
        return loss

    # -- what a trainer asks of either generation (``MoCo`` answers the same) ---------------------
    generation = "v3"  # the checkpoint layout ``training.checkpoint.load_checkpoint`` accepts

    @property
    def query_encoder(self) -> nn.Module:
        """Backbone plus projector (without the predictor): ``dim`` outputs, as the momentum encoder's."""
        return self.base_encoder

    @property
    def encoders(self) -> tuple[nn.Module, nn.Module]:
        """(base encoder, momentum encoder)."""
        return self.base_encoder, self.momentum_encoder

    def describe(self) -> str:
        return f"mlp-dim {self.predictor[0].out_features}"

    def checkpoint_extras(self, scaler: torch.amp.GradScaler) -> dict[str, Any]:
        """The official ``main_moco.py`` saves its AMP ``scaler`` and on ``--resume`` loads it into an
        enabled GradScaler, which refuses an empty state: a run without fp16 writes a fresh one's."""
        state = scaler.state_dict() if scaler.is_enabled() else torch.amp.GradScaler("cpu").state_dict()
        return {"scaler": state}

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The base encoder without its projector: what transfers downstream."""
        prefix = f"{self.projector_name}."
        return {k: v for k, v in self.base_encoder.state_dict().items() if not k.startswith(prefix)}

    def backbone_config(self) -> dict[str, Any]:
        """What rebuilds the exported backbone with timm / ``from_pretrained``: the architecture, its
        ``model_args``, the pooled feature width and the ResNet stem."""
        if self.arch is None:
            raise MocohubError("MoCoV3 was given a backbone module, so it cannot name its architecture: "
                               "build the export config yourself (zoo.build_config)")
        if self.projector_name == "fc":
            arch, model_args = resnet_architecture(self.arch, **self.backbone_args)
            layout = {}
        else:
            arch, model_args = vit_architecture(self.arch, **self.backbone_args)
            layout = {"first_conv": "patch_embed.proj", "classifier": "head"}
        return {"architecture": arch, "model_args": model_args, "num_features": self.num_features,
                "stem": self.stem, "pretrained_cfg": layout}
