"""Images in: folders of any layout, the papers' augmentations, a generated demo dataset."""
from .augment import AUGMENTATIONS, TwoViews, augmentation
from .folder import Batch, ImageFolder, collate_images
from .synthetic import make_dataset

__all__ = ["AUGMENTATIONS", "Batch", "ImageFolder", "TwoViews", "augmentation", "collate_images", "make_dataset"]
