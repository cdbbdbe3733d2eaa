"""Checkpoints with exactly the official key layouts, built from random models, and the official
rules for loading them into a reference model (REFERENCE.md section 2)."""
from __future__ import annotations

import copy

import timm
import torch
import torch.nn as nn
import torchvision

__all__ = ["tv_resnet", "moco_v1v2", "moco_v3_resnet", "moco_v3_vit", "linear_eval",
           "official_v1v2_backbone", "official_v3_backbone", "features"]


def _prefixed(prefix: str, module_or_sd) -> dict:
    sd = module_or_sd.state_dict() if isinstance(module_or_sd, nn.Module) else module_or_sd
    return {f"{prefix}{k}": v.clone() for k, v in sd.items()}


def tv_resnet(arch: str = "resnet18", seed: int = 0, **kwargs) -> nn.Module:
    """A torchvision ResNet with random (non-trivial) weights and BN statistics."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(**kwargs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return model


def moco_v1v2(arch: str = "resnet18", version: str = "v2", cleaned: bool = False, queue: int = 256) -> dict:
    """main_moco.py's checkpoint: encoder_q/encoder_k with the MoCo head, queue, pointer (cleaned: q only)."""
    encoder = tv_resnet(arch)
    width = encoder.fc.in_features
    encoder.fc = (nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 128)) if version == "v2"
                  else nn.Linear(width, 128))
    state = _prefixed("module.encoder_q.", encoder)
    if not cleaned:
        key_encoder = copy.deepcopy(encoder)
        for p in key_encoder.parameters():
            p.data.add_(1.0)  # a different key encoder must not leak into the backbone
        state |= _prefixed("module.encoder_k.", key_encoder)
        state |= {"module.queue": torch.randn(128, queue), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    ckpt = {"epoch": 200, "arch": arch, "state_dict": state}
    if not cleaned:
        ckpt["optimizer"] = torch.optim.SGD(encoder.parameters(), lr=0.03, momentum=0.9).state_dict()
    return ckpt


def _mlp(dims: list[int], last_bn: bool) -> nn.Sequential:
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=False))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=False))
    return nn.Sequential(*layers)


def moco_v3_resnet(arch: str = "resnet18") -> dict:
    """moco-v3's ResNet checkpoint: base/momentum encoders with fc.{0,1,3,4} projector, predictor."""
    base = tv_resnet(arch, zero_init_residual=True)
    width = base.fc.in_features
    base.fc = _mlp([width, 64, 32], last_bn=True)  # fc.0 Linear, fc.1 BN, fc.3 Linear, fc.4 BN
    state = _prefixed("module.base_encoder.", base) | _prefixed("module.momentum_encoder.", base)
    state |= _prefixed("module.predictor.", _mlp([32, 64, 32], last_bn=False))
    return {"epoch": 100, "arch": arch, "state_dict": state, "optimizer": {}, "scaler": {}}


def moco_v3_vit(arch: str = "vit_small") -> tuple[dict, nn.Module]:
    """moco-v3's ViT checkpoint (12 heads, 3-layer projector in .head) and the reference timm ViT."""
    torch.manual_seed(0)
    timm_name = {"vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}[arch]
    reference = timm.create_model(timm_name, num_heads=12, num_classes=0).eval()
    base = timm.create_model(timm_name, num_heads=12, num_classes=0)
    base.load_state_dict(reference.state_dict())
    base.head = _mlp([base.embed_dim, 64, 64, 32], last_bn=True)
    state = _prefixed("module.base_encoder.", base) | _prefixed("module.momentum_encoder.", base)
    state |= _prefixed("module.predictor.", _mlp([32, 64, 32], last_bn=True))
    return {"epoch": 300, "arch": arch, "state_dict": state, "optimizer": {}, "scaler": {}}, reference


def linear_eval(arch: str = "resnet18", num_classes: int = 10) -> tuple[dict, nn.Module]:
    """main_lincls.py's checkpoint (module.<torchvision names> with the trained fc) and its model."""
    model = tv_resnet(arch, num_classes=num_classes).eval()
    return {"epoch": 100, "arch": arch, "state_dict": _prefixed("module.", model), "best_acc1": 12.5,
            "optimizer": {}}, model


def official_v1v2_backbone(ckpt: dict, arch: str) -> nn.Module:
    """main_lincls.py's rule: keep encoder_q minus fc, strip the prefix, only fc may be missing."""
    sd = {k[len("module.encoder_q."):]: v for k, v in ckpt["state_dict"].items()
          if k.startswith("module.encoder_q.") and not k.startswith("module.encoder_q.fc")}
    model = getattr(torchvision.models, arch)()
    missing = model.load_state_dict(sd, strict=False).missing_keys
    assert set(missing) == {"fc.weight", "fc.bias"}
    model.fc = nn.Identity()
    return model.eval()


def official_v3_backbone(ckpt: dict, arch: str) -> nn.Module:
    """moco-v3's rule for ResNet: keep base_encoder minus fc, strip the prefix."""
    sd = {k[len("module.base_encoder."):]: v for k, v in ckpt["state_dict"].items()
          if k.startswith("module.base_encoder.") and not k.startswith("module.base_encoder.fc")}
    model = getattr(torchvision.models, arch)()
    model.fc = nn.Identity()
    model.load_state_dict(sd, strict=True)
    return model.eval()


def features(model: nn.Module, size: int = 64, seed: int = 1) -> torch.Tensor:
    """The model's output on a fixed random batch."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(torch.randn(2, 3, size, size))
