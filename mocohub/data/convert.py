"""Decoding any image file to RGB, and PIL RGB images <-> uint8 tensors."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["DECODE_ERRORS", "load_rgb", "pil_to_uint8", "uint8_to_pil"]

DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_rgb(path: str) -> Image.Image:
    """Decode fully (so truncation surfaces here, not later) and convert any mode to RGB,
    as torchvision's ImageFolder loader does."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def pil_to_uint8(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """An RGB image as a (3, H, W) uint8 tensor laid out HWC in memory (channels-last: the layout
    the antialiased uint8 resize is fastest on). Tensors pass through."""
    if isinstance(image, torch.Tensor):
        return image
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


def uint8_to_pil(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) uint8 tensor as a PIL RGB image."""
    return Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB")
