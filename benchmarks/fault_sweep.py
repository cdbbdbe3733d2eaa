"""SIGKILL a real `mocohub train` at seeded moments (mid-step, mid-checkpoint-write, mid-kNN), or SIGTERM it
mid-epoch, resume with the same command each time, and compare the end with an uninterrupted run.

    python benchmarks/fault_sweep.py [--faults 10] [--seed 0] [--epochs 5]

Prints a table: faults tried, runs resumed equal, checkpoints unreadable, data lost. The machinery
(``Fault``, ``killed_run``, ``compare``) is also what tests/test_faults.py runs, with fewer faults.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mocohub.data.synthetic import make_dataset
from mocohub.errors import MocohubError
from mocohub.run_folder import CHECKPOINT
from mocohub.training import load_checkpoint

# 20 images and K 32: --allow-large-queue (the data checks refuse more keys than images)
TINY = ["--recipe", "cifar", "--image-size", "16", "--batch-size", "8", "--moco-k", "32", "--allow-large-queue",
        "--workers", "0", "--precision", "fp32", "--no-progress", "--log-every", "1"]
# one thread per run: on shared cores two OpenMP threads spin against other processes (4 s a step, not 0.2)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# during a checkpoint write, while the epoch's kNN row is pending, at a time; "term": SIGTERM after a step
# that is not an epoch's last (the trainer checkpoints mid-epoch, with the epoch's sums, and exits 130)
KINDS = ("write", "knn", "time", "term")
STEPS_PER_EPOCH = 2  # make_data's default: 20 images in steps of 8


@dataclass
class Fault:
    """When to stop the run: ``kind`` in KINDS; ``seconds`` after the start for "time"."""

    kind: str
    seconds: float = 0.0


@dataclass
class Outcome:
    """What a killed-and-resumed run went through."""

    kills: list[str] = field(default_factory=list)  # what each kill hit
    checkpoints_seen: int = 0
    unreadable: list[str] = field(default_factory=list)
    final_rc: int | None = None


def make_data(root: Path, per_class: int = 2) -> tuple[Path, Path]:
    """10 classes of 16 px images: ``per_class`` * 10 training images (2 steps of 8 at 2), 1 val each."""
    return make_dataset(root, train_per_class=per_class, val_per_class=1, size=16)


def train_command(data: Path, val: Path, out: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "mocohub", "train", str(data), *TINY, "--epochs", str(epochs), "--val", str(val),
            "--out", str(out)]


def _readable(path: Path) -> bool:
    try:
        load_checkpoint(path)
        return True
    except (MocohubError, RuntimeError, EOFError, OSError):
        return False


def _line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _knn_pending(run: Path) -> bool:
    """An epoch's last step is logged but its metrics row (kNN monitor first) is not yet."""
    steps = _line_count(run / "steps.jsonl")
    return steps > 0 and steps % STEPS_PER_EPOCH == 0 and _line_count(run / "metrics.jsonl") < steps // STEPS_PER_EPOCH


def _link_new(ckpt: Path, last: int | None, snaps: Path) -> int | None:
    """Hard-link ``ckpt`` into ``snaps`` if it is another inode than ``last``; its inode."""
    try:
        ino = ckpt.stat().st_ino
    except FileNotFoundError:
        return last
    if ino != last:
        try:
            os.link(ckpt, snaps / f"{len(list(snaps.iterdir())):03d}.pth.tar")
        except FileNotFoundError:  # replaced between stat and link: the next poll links its successor
            return last
    return ino


def _attempt(cmd: list[str], run: Path, fault: Fault | None, snaps: Path, out: Outcome, timeout: float) -> int | None:
    """Run ``cmd`` once; SIGKILL it (SIGTERM for "term") when ``fault`` fires. Every checkpoint that appears
    is hard-linked into ``snaps`` (the inode as renamed in, whatever replaces it later). Returns the exit
    code, or None when stopped."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    start, deadline = time.monotonic(), time.monotonic() + timeout
    ckpt = run / CHECKPOINT
    last = ckpt.stat().st_ino if ckpt.exists() else None
    logged = _line_count(run / "steps.jsonl")
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(cmd)} ran past {timeout} s")
            fire = None
            last = _link_new(ckpt, last, snaps)
            if fault and fault.kind == "knn" and _knn_pending(run):
                fire = "kNN / metrics row pending"
            if fault and fault.kind == "write" and any(run.glob(f".{CHECKPOINT}.*.tmp")):
                fire = "checkpoint write"
            if fault and fault.kind == "time" and time.monotonic() - start >= fault.seconds:
                fire = f"t={fault.seconds:.1f} s"
            steps = _line_count(run / "steps.jsonl") if fault and fault.kind == "term" else logged
            if steps != logged and steps % STEPS_PER_EPOCH:
                fire = "SIGTERM mid-epoch"
            if fire:
                proc.send_signal(signal.SIGTERM if fault.kind == "term" else signal.SIGKILL)
                proc.wait(timeout=60)
                _link_new(ckpt, last, snaps)  # the checkpoint a SIGTERM writes on its way out
                if fault.kind == "knn":  # did it die with the row still pending?
                    fire += " (hit)" if _knn_pending(run) else " (missed)"
                out.kills.append(fire)
                return None
            time.sleep(0.001)
        if fault:
            out.kills.append(f"{fault.kind}: the run ended first")
        err = proc.stderr.read()
        if proc.returncode:
            sys.stderr.write(err)
        return proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def killed_run(cmd: list[str], run: Path, faults: list[Fault], snaps: Path, timeout: float = 300) -> Outcome:
    """Apply each fault to a fresh start of ``cmd`` (a resume after the first), then run it to the end.
    After every kill the checkpoint on disk must load; so must every checkpoint ever linked."""
    out = Outcome()
    snaps.mkdir(parents=True, exist_ok=True)
    for fault in faults:
        _attempt(cmd, run, fault, snaps, out, timeout)
        if (run / CHECKPOINT).exists() and not _readable(run / CHECKPOINT):
            out.unreadable.append(f"after kill {len(out.kills)}")
    out.final_rc = _attempt(cmd, run, None, snaps, out, timeout)
    seen = sorted(snaps.iterdir())
    out.checkpoints_seen = len(seen)
    out.unreadable += [p.name for p in seen if not _readable(p)]
    return out


def _rows(path: Path, keys: tuple[str, ...], index: str) -> dict[int, tuple]:
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r[index]: tuple(r.get(k) for k in keys) for r in rows}


def compare(run: Path, reference: Path) -> tuple[bool, list[str]]:
    """(weights equal, data lost): the final checkpoints' tensors bit for bit; every step and epoch
    row of the reference present with the same values."""
    mine, ref = (load_checkpoint(p / CHECKPOINT) for p in (run, reference))
    equal = mine["epoch"] == ref["epoch"] and mine["state_dict"].keys() == ref["state_dict"].keys() and all(
        torch.equal(mine["state_dict"][k], v) for k, v in ref["state_dict"].items())
    lost = []
    for name, index, keys in (("steps.jsonl", "step", ("loss", "acc1", "lr")),
                              ("metrics.jsonl", "epoch", ("loss", "acc1", "lr", "knn_top1", "skipped"))):
        got, want = _rows(run / name, keys, index), _rows(reference / name, keys, index)
        lost += [f"{name} {index} {i}" + ("" if i not in got else " differs") for i in want if got.get(i) != want[i]]
    return equal, lost


def plan(n: int, seed: int, span: float) -> list[Fault]:
    """``n`` faults: a third in checkpoint writes, kNN windows and mid-epoch SIGTERMs, the rest at seeded
    times in the first ``span`` seconds of an attempt (start-up, steps, saves alike)."""
    rng = random.Random(seed)
    placed = ("write", "knn", "term")
    faults = [Fault(placed[i % 3]) if i < max(3, n // 3) else Fault("time", rng.uniform(1.0, span)) for i in range(n)]
    rng.shuffle(faults)
    return faults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fault-sweep-") as tmp:
        root = Path(tmp)
        data, val = make_data(root / "data")
        t0 = time.monotonic()
        if subprocess.run(train_command(data, val, root / "reference", args.epochs), capture_output=True, env=ENV).returncode:
            raise SystemExit("the uninterrupted run failed")
        span = time.monotonic() - t0
        faults = plan(args.faults, args.seed, span / 2)  # later kills would find the run finished
        out = killed_run(train_command(data, val, root / "run", args.epochs), root / "run", faults, root / "snaps")
        equal, lost = compare(root / "run", root / "reference") if out.final_rc == 0 else (False, ["run failed"])
    print(f"uninterrupted run: {span:.1f} s, {args.epochs} epochs; seed {args.seed}")
    for i, (fault, hit) in enumerate(zip(faults, out.kills), 1):
        print(f"  kill {i:2d}: {fault.kind:5s} -> {hit}")
    print("\n| faults tried | runs resumed equal | checkpoints seen | checkpoints unreadable | data lost |")
    print("|---|---|---|---|---|")
    print(f"| {len(out.kills)} | {int(equal)}/1 (final exit {out.final_rc}) | {out.checkpoints_seen} | "
          f"{len(out.unreadable)} | {', '.join(lost) or 'none'} |")


if __name__ == "__main__":
    main()
