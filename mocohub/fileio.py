"""Crash-safe file writing, shared by checkpoints, exports and extracted features."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import MocohubError

__all__ = ["atomic_write", "DiskFullError", "disk_full", "disk_full_error"]

_NEARLY_FULL = 1 << 16  # bytes: a write that failed with less than this free ran out of space


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def disk_full(exc: BaseException, directory: str | os.PathLike) -> bool:
    """Whether ``exc`` came from a full disk. safetensors' Rust writer keeps only the message
    ("No space left on device (os error 28)"); torch.save's C++ writer not even that ("unexpected
    pos"), so a failed write on a (nearly) full ``directory`` counts too."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT) or \
                os.strerror(errno.ENOSPC) in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, MocohubError) or not isinstance(exc, Exception):
        return False
    try:
        return shutil.disk_usage(directory).free < _NEARLY_FULL
    except OSError:
        return False


class DiskFullError(MocohubError):
    """A write ran out of space; ``path`` is the file that was being written."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


def disk_full_error(path: str | os.PathLike, what: str = "", rerun: str = "the same command") -> DiskFullError:
    """The one message for a full disk: what was kept, and that re-running continues from it."""
    path = Path(path)
    kept = what or f"{path} was left as it was, nothing half-written"
    return DiskFullError(f"no space left on the disk holding {path.parent} while writing {path.name}: {kept}. "
                         f"Free space there, then re-run {rerun}: it continues from what was saved", path)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)``, fsync, then rename onto ``path``.

    A kill at any moment leaves either the previous file or the new one, never a torn file;
    the result gets the permissions a plain ``open()`` would give it. A full disk raises
    ``disk_full_error`` (the temp file removed, ``path`` untouched).
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        full = disk_full(e, path.parent)  # before the unlink frees the space again
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if full:
            raise disk_full_error(path) from e
        raise
    return path
