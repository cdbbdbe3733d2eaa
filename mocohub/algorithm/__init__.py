"""The MoCo algorithms: v1/v2 (encoders, momentum update, queue, InfoNCE, Shuffle BN) and v3."""
from ..lazy import lazy_exports

__all__ = ["MoCo", "MoCoV3", "build_encoder", "build_mlp", "momentum_update_", "SplitBatchNorm",
           "convert_split_batchnorm"]

__getattr__, __dir__ = lazy_exports(__name__, {
    ".moco": ("MoCo", "build_encoder"),
    ".moco_v3": ("MoCoV3", "build_mlp"),
    ".momentum": ("momentum_update_",),
    ".split_bn": ("SplitBatchNorm", "convert_split_batchnorm"),
})
