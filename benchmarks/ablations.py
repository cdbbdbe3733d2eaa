"""MoCo's ablations as one command: a grid of `mocohub train` runs per study, a table and a plot.

    python benchmarks/ablations.py STUDY --size cpu|full [--out DIR] [--seeds N] [--data TAR_OR_DIR] [--dry-run]
                                   [--settings NAME,NAME] [--epochs N]

STUDY is one of
    momentum    --moco-m 0, 0.9, 0.99, 0.999 (the paper: 0 fails, 0.9 much worse, 0.99-0.9999 work)
    shuffle-bn  --shuffle-bn true / false, 8 BN groups (without it the model cheats through BN statistics)
    queue       --moco-k over a range at a fixed batch (a larger queue, better features)
    v1-v2       v1, v1 + MLP head, v1 + MLP + T 0.2, v2 (MLP, T 0.2, aug+)
    symmetric   --symmetric false / true (the official CIFAR-10 demo: 82.6 vs 85.3 kNN at 200 epochs)
    all         the five, one after the other.

The studies and sizes are data (``benchmarks/ablation_studies.py``: STUDIES, SIZES). Every setting is a
set of `mocohub train` flags on top of the size's base flags (recipe `cifar`), run for ``--seeds`` seeds
(0, 1, ...; at least 2); a setting `mocohub train` would refuse is dropped, with its reason noted. Each run
is one ``python -m mocohub train ... --json`` process with ``--val`` on held-out images (the kNN monitor
scores every epoch) and an ``--out`` folder of its own; its results are read from that folder's
metrics.jsonl and run.json (``benchmarks/ablation_report.py``).

Sizes: ``cpu`` a CIFAR-10 subset (the first N file names of each class), small model, few epochs: for 2
CPU cores; ``full`` the official CIFAR-10 demo (all 50,000 training images, kNN on the 10,000 test images,
ResNet-18 with the 3x3 stem, 200 epochs, batch 512): for a GPU. Data (``benchmarks/ablation_data.py``):
``--data`` is the CIFAR-10 JPEG archive (default $CIFAR_TAR, else ../shared/data/cifar10-jpg.tar.gz, else
.cifar/cifar10-jpg.tar.gz next to this checkout) or an unpacked folder with train/ and val/ (or test/).

Output (OUT defaults to runs/ablations-<size>):
    OUT/data/                       the images (SUBSET.json says from what)
    OUT/<study>/runs/<setting>-seed<S>/   each run's `mocohub train --out` folder (metrics.jsonl, run.json,
                                    checkpoint.pth.tar, ablation.log: the run's own output)
    OUT/<study>/results.jsonl       one row per run: setting, flags, seed, final kNN top-1 and pretext
                                    accuracy, per-epoch curves, seconds, CPU capability and precision
    OUT/<study>/<study>.md, .png    the table (mean and spread over seeds) and the curves, per setting

Resuming: run the same command again. A run already in results.jsonl is skipped; any other run is started
with the same command, and `mocohub train` resumes RUN_DIR/checkpoint.pth.tar by itself (a finished one
only exports again), or refuses settings that changed since (then pass another --out). Ctrl-C lets the
current run checkpoint first. A run whose loss diverged is recorded as diverged, not retried; delete its
row and folder to run it again.
"""
from __future__ import annotations

import argparse
import collections
import json
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the ablation_* modules beside this script
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mocohub from this checkout when not installed

from ablation_data import TAR_NAME, Images, prepare_data  # noqa: E402
from ablation_report import (MARK_NAME, RESULTS_NAME, machine, plot_study, result_row, summary,  # noqa: E402
                             write_report)
from ablation_studies import PUBLIC_SIZES, SIZES, STUDIES, Flags, Setting, flag_list, plan, train_config  # noqa: E402

from mocohub.errors import EXIT_DIVERGED, MocohubError  # noqa: E402
from mocohub.fileio import atomic_write  # noqa: E402
from mocohub.jsonlog import append_jsonl, read_jsonl  # noqa: E402
from mocohub.run_folder import RunFolder  # noqa: E402
from mocohub.training.resume import config_differences  # noqa: E402

RUN_LOG = "ablation.log"  # the run's stderr and result, appended over its invocations


@dataclass
class Run:
    study: str
    setting: Setting
    seed: int
    flags: Flags  # every train flag but the paths
    run_dir: Path

    @property
    def label(self) -> str:
        return f"{self.study} {self.setting.name} seed {self.seed}"

    def command(self, images: Images) -> list[str]:
        return [sys.executable, "-m", "mocohub", "train", str(images.train), *flag_list(self.flags), "--val",
                str(images.val), "--out", str(self.run_dir), "--no-progress", "--json"]


def _add_to_mark(run: Run, seconds: float, launches: int) -> None:
    path = run.run_dir / MARK_NAME
    mark = json.loads(path.read_text()) if path.exists() else {}
    text = json.dumps({"wall_seconds": mark.get("wall_seconds", 0.0) + seconds,
                       "launches": mark.get("launches", 0) + launches})
    atomic_write(path, lambda p: Path(p).write_text(text))


def launch(run: Run, images: Images) -> tuple[int, str]:
    """Run one `mocohub train`: its stderr goes to RUN_DIR/ablation.log and, indented, here. Returns (exit
    code, its last line). Ctrl-C: the trainer checkpoints; we wait for it, then stop."""
    cmd = run.command(images)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    _add_to_mark(run, 0.0, 1)
    t0, tail = time.perf_counter(), collections.deque(maxlen=1)
    with open(run.run_dir / RUN_LOG, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        # its own session: a Ctrl-C reaches this script only, which passes one SIGINT on (a second one would
        # stop the trainer without its checkpoint)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.PIPE, text=True, bufsize=1,
                                start_new_session=True)
        try:
            for line in proc.stderr:
                log.write(line)
                log.flush()
                print("    " + line.rstrip(), flush=True)
                tail.extend([line.strip()] if line.strip() else [])
            proc.wait()
        except BaseException as e:  # Ctrl-C, SIGTERM, or this script failing (e.g. its stdout closed)
            if isinstance(e, KeyboardInterrupt):
                print(f"\ninterrupted: {run.label} finishes its step and saves a checkpoint (Ctrl-C again: "
                      "stop it at once) ...", file=sys.stderr, flush=True)
            proc.send_signal(signal.SIGINT)  # the trainer finishes its step and checkpoints
            try:
                log.write(proc.stderr.read())
                proc.wait()
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)
                proc.wait()
            raise
        finally:
            _add_to_mark(run, time.perf_counter() - t0, 0)
    return proc.returncode, tail[0] if tail else ""


def _recorded(row: dict[str, Any] | None, run: Run, results: Path) -> bool:
    """Whether ``row`` is this run's result. Flags the trainer would refuse to resume with are refused
    here too (its rule); flags it may change (epochs, workers, ...) make the row stale: run again."""
    if row is None or row["flags"] == run.flags:
        return row is not None
    refused, _ = config_differences(train_config(row["flags"]).as_dict(), train_config(run.flags).as_dict())
    if refused:
        raise MocohubError(f"{results} has {run.label} with other settings ({'; '.join(refused)}): the study "
                           "changed since: pass another --out")
    return False


def _train(run: Run, images: Images, epochs: int, size: str, info: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume, or finish) the run; its row, done or diverged."""
    code, last = launch(run, images)
    status = "diverged" if code == EXIT_DIVERGED else "done"
    rows = read_jsonl(RunFolder(run.run_dir).metrics)
    if status == "done" and (code != 0 or not any(r.get("epoch") == epochs - 1 for r in rows)):
        raise MocohubError(f"{run.label} failed (exit {code}): {last or 'see the log'}; its output is in "
                           f"{run.run_dir / RUN_LOG} (the same command resumes it)", exit_code=code if code > 0 else 1)
    return result_row(run.run_dir, study=run.study, setting=run.setting, seed=run.seed, flags=run.flags, size=size,
                      epochs=epochs, status=status, machine_info=info, error=last if status != "done" else None)


def run_study(name: str, args: argparse.Namespace, images: Images, info: dict[str, Any]) -> None:
    study, size = STUDIES[name], SIZES[args.size]
    base = size.base_flags(args.epochs)
    settings, notes = plan(study, size, base, args.settings)
    epochs, study_dir = int(base["--epochs"]), args.out / name
    runs = [Run(name, s, seed, {**base, **s.flags, "--seed": str(seed)}, study_dir / "runs" / f"{s.name}-seed{seed}")
            for s in settings for seed in range(args.seeds)]
    print(f"== {name}: {len(settings)} settings x {args.seeds} seeds = {len(runs)} runs -> {study_dir}", flush=True)
    for note in notes:
        print(f"   note: {note}", flush=True)
    results = study_dir / RESULTS_NAME
    recorded = {(r["setting"], r["seed"]): r for r in read_jsonl(results)}
    for i, run in enumerate(runs, 1):
        head, row = f"[{i}/{len(runs)}] {run.label}", recorded.get((run.setting.name, run.seed))
        if args.dry_run:
            state = "skipped (recorded)" if row else \
                ("would resume" if RunFolder(run.run_dir).checkpoint.exists() else "would run")
            print(f"{head}: {state}\n    {shlex.join(run.command(images))}", flush=True)
            continue
        if _recorded(row, run, results):
            print(f"{head}: skipped ({row['status']}: {summary(row)})", flush=True)
            continue
        print(f"{head}: training ({' '.join(flag_list(run.setting.flags))})", flush=True)
        row = _train(run, images, epochs, args.size, info)
        stale = (run.setting.name, run.seed) in recorded
        recorded[(run.setting.name, run.seed)] = row
        if stale:  # the row of the run's earlier flags, replaced
            text = "".join(json.dumps(r) + "\n" for r in recorded.values())
            atomic_write(results, lambda p: Path(p).write_text(text))
        else:
            append_jsonl(results, [row])
        print(f"{head}: {row['status']}: {summary(row)}", flush=True)
    if args.dry_run:
        return
    rows = [recorded[(r.setting.name, r.seed)] for r in runs]
    md = write_report(study_dir / f"{name}.md", rows, study=name, claim=study.claim, settings=settings, notes=notes,
                      size=args.size, base=base, n_train=images.n_train, n_val=images.n_val, seeds=args.seeds)
    png = plot_study(study_dir / f"{name}.png", rows, study=name, settings=settings, size=args.size,
                     seeds=args.seeds, classes=images.classes)
    print("\n".join(line for line in md.read_text().splitlines() if line.startswith("|")))
    print(f"== {name}: {md} and {png}", flush=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:3]),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="The module docstring (benchmarks/ablations.py): the layout, resuming.")
    p.add_argument("study", choices=(*STUDIES, "all"))
    p.add_argument("--size", required=True, choices=tuple(SIZES), metavar="{" + ",".join(PUBLIC_SIZES) + "}",
                   help="cpu: a CIFAR-10 subset for 2 CPU cores; full: the official CIFAR-10 demo, for a GPU")
    p.add_argument("--out", type=Path, default=None, help="default: runs/ablations-<size>")
    p.add_argument("--seeds", type=int, default=2, help="seeds per setting (0, 1, ...), at least 2")
    p.add_argument("--data", type=Path, default=None,
                   help=f"the {TAR_NAME} archive, or a folder with train/ and val/ (or test/); default: $CIFAR_TAR, "
                        f"../shared/data/{TAR_NAME}, .cifar/{TAR_NAME}")
    p.add_argument("--dry-run", action="store_true", help="print the commands; train and write nothing")
    p.add_argument("--settings", type=lambda v: v.split(","), default=None, metavar="NAME,NAME",
                   help="only these settings of the study (e.g. m0,m0.99 of momentum)")
    p.add_argument("--epochs", type=int, default=None,
                   help="instead of the size's epochs: a run that fits a time budget (benchmarks/gpu_check.sh)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.seeds < 2:
        p.error("--seeds: at least 2 (the table and plot show the spread over seeds)")
    args.out = args.out or Path("runs") / f"ablations-{args.size}"
    size = SIZES[args.size]
    previous = signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C: the running trainer checkpoints first
    try:
        images = prepare_data(args.data, args.out, (size.train_per_class, size.val_per_class), args.dry_run)
        info = {} if args.dry_run else machine()
        if info:
            gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
            print(f"machine: CPU capability {info['cpu_capability']}{gpu}"
                  + f", OMP_NUM_THREADS {info['omp_num_threads']}; data {images.train} ({images.n_train} images), "
                  f"{images.val}", flush=True)
        for name in STUDIES if args.study == "all" else (args.study,):
            run_study(name, args, images, info)
    except MocohubError as e:
        print(f"ablations.py: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: run the same command to resume (finished runs are skipped)", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
