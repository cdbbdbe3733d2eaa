"""Transfer of MoCo backbones to detection: torchvision backbones and detectron2 weights."""
from ..lazy import lazy_exports

__all__ = ["NORMS", "convert_to_detectron2", "detection_backbone", "detectron2_key", "to_detectron2"]

__getattr__, __dir__ = lazy_exports(__name__, {
    ".backbone": ("NORMS", "detection_backbone"),
    ".detectron2": ("convert_to_detectron2", "detectron2_key", "to_detectron2"),
})
