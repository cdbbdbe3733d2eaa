"""The MoCo algorithms: v1/v2 (encoders, momentum update, queue, InfoNCE, Shuffle BN) and v3."""
from .moco import MoCo, build_encoder
from .moco_v3 import MoCoV3, build_mlp
from .momentum import momentum_update_
from .split_bn import SplitBatchNorm, convert_split_batchnorm

__all__ = ["MoCo", "MoCoV3", "build_encoder", "build_mlp", "momentum_update_", "SplitBatchNorm",
           "convert_split_batchnorm"]
