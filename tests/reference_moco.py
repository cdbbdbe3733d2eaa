"""An independent transcription of the official MoCo v1/v2 forward (facebookresearch/moco,
main_moco.py + moco/builder.py semantics), written plainly: torchvision encoders, a per-parameter
momentum loop, einsum logits, slice-assignment enqueue. Tests compare mocohub against it."""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision


def official_encoder(arch: str, dim: int, mlp: bool, cifar_stem: bool) -> nn.Module:
    net = getattr(torchvision.models, arch)(num_classes=dim)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    if mlp:
        hidden = net.fc.weight.shape[1]
        net.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), net.fc)
    return net


class ReferenceMoCo(nn.Module):
    def __init__(self, arch="resnet18", dim=128, K=65536, m=0.999, T=0.07, mlp=False, cifar_stem=False):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q = official_encoder(arch, dim, mlp, cifar_stem)
        self.encoder_k = official_encoder(arch, dim, mlp, cifar_stem)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", nn.functional.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def forward(self, im_q, im_k):
        q = nn.functional.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
                param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)
            idx_shuffle = torch.randperm(im_k.shape[0]).to(im_k.device)
            idx_unshuffle = torch.argsort(idx_shuffle)
            k = nn.functional.normalize(self.encoder_k(im_k[idx_shuffle]), dim=1)
            k = k[idx_unshuffle]
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        with torch.no_grad():
            ptr = int(self.queue_ptr)
            self.queue[:, ptr:ptr + k.shape[0]] = k.T
            self.queue_ptr[0] = (ptr + k.shape[0]) % self.K
        return logits, labels
