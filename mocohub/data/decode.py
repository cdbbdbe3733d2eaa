"""Encoded image bytes to packed RGB bytes, the cost of a small JPEG being libjpeg's alone.

Opening a 32-px JPEG with ``Image.open`` costs more than decoding it: the plugin parses every
marker in Python (about 70 of 100 us). An RGB JPEG (three 8-bit components: nearly every photo)
is decoded here by the same libjpeg decoder with the same arguments PIL's JPEG plugin passes it,
given the size from the frame header read here; PIL releases the GIL while it decodes, so threads
decode in parallel. Anything else (PNG, greyscale or CMYK JPEG, a header this reader does not
follow, an image PIL would warn about as a decompression bomb) goes through ``load_rgb``.
"""
from __future__ import annotations

import io
from typing import IO

from PIL import Image, ImageFile, JpegImagePlugin

from .convert import load_rgb

__all__ = ["read_bytes", "jpeg_size", "header_size", "decode_rgb"]

_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def read_bytes(image: str | IO[bytes]) -> bytes:
    """The encoded bytes of a path or a file object."""
    if isinstance(image, str):
        with open(image, "rb") as f:
            return f.read()
    return image.read()


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of an RGB JPEG from its frame header (as PIL's JPEG plugin reads it), or
    None for any other data, or any marker before the frame that the plugin does not know."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    i = 2
    while i + 10 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if (0xFF00 | marker) not in JpegImagePlugin.MARKER or marker == 0xDA:  # unknown, or the scan before a frame
            return None
        if marker in _SOF:
            precision, height, width, components = data[i + 4], data[i + 5:i + 7], data[i + 7:i + 9], data[i + 9]
            width, height = int.from_bytes(width, "big"), int.from_bytes(height, "big")
            return (width, height) if precision == 8 and components == 3 and width and height else None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone; (0, 0) when unreadable."""
    size = jpeg_size(data)
    if size is not None:
        return size
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # noqa: BLE001 - any unreadable header: the decode will report it
        return 0, 0


def _fast(size: tuple[int, int] | None) -> bool:
    limit = Image.MAX_IMAGE_PIXELS
    return (size is not None and not ImageFile.LOAD_TRUNCATED_IMAGES
            and (limit is None or size[0] * size[1] <= limit))


def decode_rgb(data: bytes) -> tuple[tuple[int, int], bytes]:
    """((width, height), the pixels as packed RGB rows), the pixels those of ``load_rgb``; raises
    one of ``DECODE_ERRORS`` for what it cannot decode."""
    size = jpeg_size(data)
    if _fast(size):
        try:  # the plugin's tile: decoder "jpeg", raw mode "RGB", no JPEG colour space forced
            return size, Image.frombytes("RGB", size, data, "jpeg", "RGB", "").tobytes()
        except ValueError:  # truncated or corrupt: PIL's full path decides, and says why
            pass
    image = load_rgb(io.BytesIO(data))
    return image.size, image.tobytes()
