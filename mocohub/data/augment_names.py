"""The augmentation recipes' names, for a parser's choices without torchvision (augment.py builds them;
tests/test_cli_startup.py checks the two agree)."""
__all__ = ["AUGMENTATION_NAMES"]

AUGMENTATION_NAMES = ("moco-v1", "moco-v2", "moco-v3", "cifar")
