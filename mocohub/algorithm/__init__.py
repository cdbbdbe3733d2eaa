"""The MoCo algorithm: encoders, momentum update, queue, InfoNCE and Shuffle BN."""
from .moco import MoCo, build_encoder
from .momentum import momentum_update_
from .split_bn import SplitBatchNorm, convert_split_batchnorm

__all__ = ["MoCo", "build_encoder", "momentum_update_", "SplitBatchNorm", "convert_split_batchnorm"]
