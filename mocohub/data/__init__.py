"""Images in: folders of any layout, the papers' augmentations (per image, or batched), a generated demo dataset."""
from ..lazy import lazy_exports

__all__ = ["AUGMENTATIONS", "Batch", "BatchedTwoViews", "ImageFolder", "TwoViews", "ViewCrops", "augmentation",
           "collate_images", "make_dataset", "two_views"]

__getattr__, __dir__ = lazy_exports(__name__, {
    ".augment": ("AUGMENTATIONS", "TwoViews", "augmentation", "two_views"),
    ".batched": ("BatchedTwoViews", "ViewCrops"),
    ".folder": ("Batch", "ImageFolder", "collate_images"),
    ".synthetic": ("make_dataset",),
})
