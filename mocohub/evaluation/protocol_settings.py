"""The linear protocols' settings, apart from the torch code that runs them (linear.py), so the
evaluation commands' parsers list them without torch."""
from __future__ import annotations

import dataclasses

__all__ = ["LinearProtocol", "PROTOCOLS", "DEFAULT_WEIGHT_DECAYS"]


@dataclasses.dataclass(frozen=True)
class LinearProtocol:
    """Hyper-parameters of a linear evaluation; ``lr`` is for ``batch_size`` images per step."""

    epochs: int
    lr: float
    batch_size: int
    schedule: str  # "step" (x0.1 at each milestone) or "cosine" (per epoch)
    milestones: tuple[int, ...] = ()
    momentum: float = 0.9
    weight_decay: float = 0.0
    base_lr: float | None = None  # lr per 256 images: then lr follows batch_size (lr = base_lr * batch / 256)


PROTOCOLS = {
    # MoCo v1/v2 main_lincls.py
    "v1": LinearProtocol(epochs=100, lr=30.0, batch_size=256, schedule="step", milestones=(60, 80)),
    # MoCo v3 main_lincls.py (lr = base lr * batch / 256): base lr 0.1 for ResNet, 3 for ViT-S/B
    "v3": LinearProtocol(epochs=90, lr=0.1 * 1024 / 256, batch_size=1024, schedule="cosine", base_lr=0.1),
    "v3-vit": LinearProtocol(epochs=90, lr=3.0 * 1024 / 256, batch_size=1024, schedule="cosine", base_lr=3.0),
}

DEFAULT_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # the fast probe's, chosen on a hold-out
