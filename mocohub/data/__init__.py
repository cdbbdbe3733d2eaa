"""Images in: folders of any layout, the papers' augmentations (per image, or batched), a generated demo dataset."""
from .augment import AUGMENTATIONS, TwoViews, augmentation, two_views
from .batched import BatchedTwoViews, ViewCrops
from .folder import Batch, ImageFolder, collate_images
from .synthetic import make_dataset

__all__ = ["AUGMENTATIONS", "Batch", "BatchedTwoViews", "ImageFolder", "TwoViews", "ViewCrops", "augmentation",
           "collate_images", "make_dataset", "two_views"]
