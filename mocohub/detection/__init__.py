"""Transfer of MoCo backbones to detection: torchvision backbones and detectron2 weights."""
from .backbone import NORMS, detection_backbone
from .detectron2 import convert_to_detectron2, detectron2_key, to_detectron2

__all__ = ["NORMS", "convert_to_detectron2", "detection_backbone", "detectron2_key", "to_detectron2"]
