"""What a resume may change: a checkpoint's settings against the command line's.

A resumed run is the same experiment continued. Settings that define the experiment (the model,
the queue, the batch, the data, the loss and optimiser) must match or the resume is refused with
each difference named; settings of the hardware and of the schedule's length may change and are
reported. The number of processes may change too: the sampler cuts each epoch into global batches
(see ``ResumableSampler``), so the position maps exactly.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["MAY_CHANGE", "config_differences", "data_fingerprint", "describe"]

# Changing these continues the same experiment: the schedule's length and peak, the hardware, monitoring.
MAY_CHANGE = frozenset({
    "epochs", "lr", "workers", "precision", "channels_last", "device", "val", "knn_every", "knn_k", "knn_t",
    "max_steps", "log_every", "progress", "out", "resume", "restart", "data", "tensorboard", "compile",
    "aug_impl", "aug_device", "cache_images", "world_size", "allow_large_queue",
})
# Descriptive fields with no effect on the computation.
IGNORED = frozenset({"paper", "moco_version", "recipe"})


# a relative name that pathlib writes otherwise (an empty or "." part), in the names joined by newlines
# with one more at either end: its parts are separated by "/" and its ends by "\n"
_UNNORMAL = re.compile(r"[\n/]\.?[\n/]")


def _relative(path: str, root: Path) -> str:
    return str(Path(path).relative_to(root))


def data_fingerprint(root: str | Path, paths: Iterable[str]) -> dict[str, Any]:
    """Image count and a hash of the relative file names: a moved folder still matches, another
    data set (or a changed one) does not. The names are relative as pathlib writes them, sorted and
    joined by newlines (the value checkpoints hold); they are cut by string slicing, pathlib
    taking over only where it would write a name otherwise: a million names in about a second."""
    root = Path(root)
    prefix = os.path.join(str(root), "")
    rel = sorted(p[len(prefix):] if p.startswith(prefix) else _relative(p, root) for p in paths)
    joined = "\n".join(rel)
    if _UNNORMAL.search(f"\n{joined}\n"):
        rel = sorted(_relative(prefix + name, root) for name in rel)
        joined = "\n".join(rel)
    digest = hashlib.sha256(joined.encode()).hexdigest()[:16]
    return {"images": len(rel), "names_sha256": digest}


def describe(value: Any) -> str:
    return "unset" if value is None else str(value)


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, changed): lines ``name: saved -> current`` for fields that must match and for
    fields that may change. Fields missing on either side (an older checkpoint) are not compared."""
    refused, changed = [], []
    for name in sorted(set(saved) & set(current) - IGNORED):
        old, new = saved[name], current[name]
        if isinstance(old, (list, tuple)) or isinstance(new, (list, tuple)):
            old, new = list(old or []), list(new or [])
        if old == new:
            continue
        line = f"{name}: {describe(old)} -> {describe(new)}"
        (changed if name in MAY_CHANGE else refused).append(line)
    return refused, changed
