"""MoCo v1/v2: a query encoder, its momentum copy, and a queue of negative keys.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020;
Chen et al., "Improved Baselines with Momentum Contrastive Learning" (v2: MLP head, T=0.2, aug+).
Module and buffer names follow the official implementation, so its checkpoints load strictly.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones import create_resnet, resnet_architecture
from .distributed import concat_all_gather, shuffle_across_ranks, unshuffle
from .momentum import momentum_update_
from .split_bn import convert_split_batchnorm

__all__ = ["MoCo", "build_encoder"]


def build_encoder(backbone: str | nn.Module, dim: int, mlp: bool, stem: str = "imagenet") -> nn.Module:
    """A ResNet whose ``fc`` is the MoCo head: Linear(feat, dim), or feat-ReLU-dim with ``mlp`` (v2)."""
    if isinstance(backbone, str):
        encoder = create_resnet(backbone, num_classes=dim, stem=stem)
    else:
        encoder = backbone
        fc = getattr(encoder, "fc", None)
        features = fc.in_features if isinstance(fc, nn.Linear) else getattr(encoder, "num_features", None)
        if fc is None or features is None:
            raise ValueError("a backbone module needs the ResNet layout: an `fc` classifier "
                             "(nn.Linear, or nn.Identity with a `num_features` attribute)")
        encoder.fc = nn.Linear(features, dim)
    if mlp:
        hidden = encoder.fc.in_features
        encoder.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), encoder.fc)
    return encoder


class MoCo(nn.Module):
    """``loss = F.cross_entropy(*moco(im_q, im_k))``, or ``loss, logits, labels = moco(im_q, im_k,
    return_loss=True)`` (the only form with ``symmetric``).

    Args:
        backbone: a ResNet name (timm/torchvision layout) or module with an ``fc`` layer.
        dim: feature dimension of the keys; K: queue size; m: key-encoder momentum;
        T: softmax temperature; mlp: 2-layer MLP head (MoCo v2).
        stem: "cifar" for a 3x3 stride-1 stem without max-pool (32-px images).
        bn_splits: BatchNorm statistics over this many sub-batches (Shuffle BN on one device).
        symmetric: also contrast the swapped views and enqueue both keys (the official CIFAR-10 demo):
            loss = ctr(q1, k2) + ctr(q2, k1); K must then be divisible by twice the global batch.
        shuffle_bn: compute the keys on a shuffled batch (across ranks; on one process, across the
            ``bn_splits`` groups) and unshuffle them, as the official code. ``False`` is the paper's
            ablation ("Shuffling BN" in He et al. 2020, and its appendix): each key is then normalised over
            the same images as its query, so the model can "cheat" through the BN statistics (the
            pretext accuracy climbs while the features get worse). For ablations, not for real runs.
    """

    sync_bn = False  # Shuffle BN (or SplitBatchNorm) stands in for synchronised statistics

    def __init__(self, backbone: str | nn.Module = "resnet50", dim: int = 128, K: int = 65536,
                 m: float = 0.999, T: float = 0.07, mlp: bool = False, *, stem: str = "imagenet",
                 bn_splits: int = 1, symmetric: bool = False, shuffle_bn: bool = True):
        super().__init__()
        self.K, self.m, self.T, self.symmetric, self.shuffle_bn = K, m, T, symmetric, shuffle_bn
        self.arch, self.stem, self.mlp = (backbone if isinstance(backbone, str) else None), stem, mlp
        self.encoder_q = convert_split_batchnorm(build_encoder(backbone, dim, mlp, stem), bn_splits)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        self.encoder_k.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self, m: float | None = None) -> None:
        momentum_update_(list(self.encoder_k.parameters()), list(self.encoder_q.parameters()),
                         self.m if m is None else m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Write the keys of every rank at the pointer; index arithmetic stays on the device."""
        keys = concat_all_gather(keys)
        n = keys.shape[0]
        if self.K % n:
            raise ValueError(f"queue size K={self.K} must be divisible by the {n} keys enqueued per step "
                             "(the global batch size; twice it with the symmetric loss)")
        slots = self.queue_ptr + torch.arange(n, device=keys.device)
        self.queue.index_copy_(1, slots, keys.t())
        self.queue_ptr.add_(n).remainder_(self.K)

    def _contrast(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE logits (N x (1+K), positives in column 0) of the queries against their keys and the
        queue, and the keys (computed under Shuffle BN, unless ``shuffle_bn`` is off)."""
        q = self.encoder_q(im_q)
        with torch.no_grad():
            if self.shuffle_bn:
                im_k, inverse = shuffle_across_ranks(im_k)  # Shuffle BN
            k = self.encoder_k(im_k)
            if self.shuffle_bn:
                k = unshuffle(k, inverse)
        with torch.autocast(q.device.type, enabled=False):  # the logits in the queue's fp32, not bf16/fp16
            q = F.normalize(q.to(self.queue.dtype), dim=1)
            k = F.normalize(k.to(self.queue.dtype), dim=1)
            l_pos = (q * k).sum(dim=1, keepdim=True)
            l_neg = q @ self.queue.clone().detach()
            return torch.cat([l_pos, l_neg], dim=1) / self.T, k

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, m: float | None = None, *, return_loss: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """InfoNCE logits and their labels (zeros), or with ``return_loss`` (a keyword, so that DDP's
        forward carries it) ``(loss, logits, labels)``, the triple ``MoCoV3`` returns too; with
        ``symmetric`` the logits of both directions are stacked (2N rows) and the loss is the sum of
        the two cross-entropies. ``m``: this step's key-encoder momentum (default: the fixed ``self.m``)."""
        if self.symmetric and not return_loss:
            raise ValueError("the symmetric loss is a sum of two cross-entropies: call "
                             "moco(im_q, im_k, return_loss=True) -> (loss, logits, labels)")
        with torch.no_grad():
            self._momentum_update_key_encoder(m)
        logits, k = self._contrast(im_q, im_k)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, labels) if return_loss else None
        if self.symmetric:
            logits_21, k1 = self._contrast(im_k, im_q)
            loss = loss + F.cross_entropy(logits_21, labels)
            logits, labels, k = torch.cat([logits, logits_21]), torch.cat([labels, labels]), torch.cat([k1, k])
        self._dequeue_and_enqueue(k)
        return (loss, logits, labels) if return_loss else (logits, labels)

    # -- what a trainer asks of either generation (``MoCoV3`` answers the same) -------------------
    generation = "v1/v2"  # the checkpoint layout ``training.checkpoint.load_checkpoint`` accepts

    @property
    def query_encoder(self) -> nn.Module:
        """Backbone plus head: the encoder that learns (``dim`` outputs)."""
        return self.encoder_q

    @property
    def encoders(self) -> tuple[nn.Module, nn.Module]:
        """(query encoder, key encoder)."""
        return self.encoder_q, self.encoder_k

    def describe(self) -> str:
        return f"K {self.K}, {'MLP' if self.mlp else 'linear'} head"

    def checkpoint_extras(self, scaler: torch.amp.GradScaler) -> dict[str, Any]:
        """Entries of the official v1/v2 checkpoint beyond epoch, arch, state_dict, optimizer: none."""
        return {}

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The query encoder without its MoCo head: what transfers downstream."""
        return {k: v for k, v in self.encoder_q.state_dict().items() if not k.startswith("fc.")}

    def backbone_config(self) -> dict[str, Any]:
        """What rebuilds the exported backbone (see ``MoCoV3.backbone_config``)."""
        if self.arch is None:
            raise ValueError("MoCo was given a backbone module, so it cannot name its architecture: "
                             "build the export config yourself (zoo.build_config)")
        arch, model_args = resnet_architecture(self.arch)
        return {"architecture": arch, "model_args": model_args, "num_features": self.encoder_q.num_features,
                "stem": self.stem, "pretrained_cfg": {}}
