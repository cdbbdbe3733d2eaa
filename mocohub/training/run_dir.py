"""The run folder: a fresh name by default, one training process at a time, and ``--restart``."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from ..errors import MocohubError
from ..run_folder import RunFolder

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the guard is skipped
    fcntl = None

__all__ = ["fresh_run_dir", "prepare_run_dir", "RunLock", "set_aside"]

def fresh_run_dir(recipe: str, arch: str, root: str | Path = "runs") -> Path:
    """``runs/<recipe>-<arch>-<date>-<time>``, never an existing folder: a new experiment never
    continues an old one by accident."""
    stem = Path(root) / f"{recipe}-{arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = stem, 1
    while path.exists():
        n += 1
        path = stem.with_name(f"{stem.name}-{n}")
    return path


def prepare_run_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise MocohubError(f"cannot write to run directory {path}: {e.strerror}; choose another --out") from e


class RunLock:
    """An advisory lock on RUN_DIR/.lock holding the owner's PID. The kernel drops it when the
    process dies, so a crashed run never leaves the folder locked."""

    def __init__(self, run_dir: Path):
        self.path, self.file = RunFolder(run_dir).lock, None
        if fcntl is None:
            return
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise MocohubError(f"{run_dir} is in use by another mocohub train (PID {owner}): wait for it to "
                               "finish, stop it, or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self.file = f

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing drops the lock
            self.file = None


def set_aside(run_dir: Path, names: list[str]) -> Path | None:
    """Move the named files of an earlier run into RUN_DIR/previous-<time>/ (for ``--restart``):
    nothing is deleted, and the folder starts clean."""
    present = [run_dir / n for n in names if (run_dir / n).exists()]
    if not present:
        return None
    aside = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while aside.exists():
        n += 1
        aside = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    aside.mkdir()
    for p in present:
        p.rename(aside / p.name)
    return aside
