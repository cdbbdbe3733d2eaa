"""Data-loading defaults that command-line parsers read: no torch, numpy or PIL here."""
from __future__ import annotations

import os

__all__ = ["DEFAULT_WORKERS", "DEFAULT_SHARD_BYTES"]

DEFAULT_SHARD_BYTES = 10 ** 9  # bytes per shard file
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)  # decoding processes: more than the cores only contend
