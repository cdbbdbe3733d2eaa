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

Every setting is a set of `mocohub train` flags on top of the size's base flags (recipe `cifar`), run for
``--seeds`` seeds (0, 1, ...; at least 2). Each run is one ``python -m mocohub train`` process (the public
CLI) with ``--val`` on held-out images, so the kNN monitor scores every epoch, ``--json`` and an ``--out``
folder of its own; its results are read from that folder's ``metrics.jsonl``.

Sizes (all their numbers are in ``SIZES`` below):
    cpu   a CIFAR-10 subset (the first N file names of each class), small model, few epochs: for 2 CPU cores
    full  the official CIFAR-10 demo: all 50,000 training images, kNN on the 10,000 test images, ResNet-18
          with the 3x3 stem, 200 epochs, batch 512: for a GPU

Data: ``--data`` is the CIFAR-10 JPEG archive (members train/<class>/*.jpg and test/<class>/*.jpg; default
$CIFAR_TAR, else ../shared/data/cifar10-jpg.tar.gz, else .cifar/cifar10-jpg.tar.gz next to this checkout)
or an unpacked folder with train/ and val/ (or test/), one sub-folder per class. From the archive the
size's images are streamed into OUT/data/train and OUT/data/val once (the whole archive is never
unpacked for a subset); a folder is used as it is, or as a hard-linked per-class subset in OUT/data
when it holds more than the size takes.

Output (OUT defaults to runs/ablations-<size>):
    OUT/data/                       the images (SUBSET.json says from what)
    OUT/<study>/runs/<setting>-seed<S>/   each run's `mocohub train --out` folder (metrics.jsonl,
                                    checkpoint.pth.tar, ablation.log: the run's own output)
    OUT/<study>/results.jsonl       one row per run: setting, flags, seed, final kNN top-1 and pretext
                                    accuracy, per-epoch curves, seconds, CPU capability and precision
    OUT/<study>/<study>.md, .png    the table (mean and spread over seeds) and the curves, per setting

Resuming: run the same command again. A run already in results.jsonl is skipped; a run whose
metrics.jsonl has its final epoch is recorded without training; any other run is started with the
same command, and `mocohub train` resumes RUN_DIR/checkpoint.pth.tar by itself (Ctrl-C lets the
current run checkpoint first). A run whose loss diverged (exit 3) is recorded as diverged, not
retried; delete its row and folder to run it again. Changed settings (e.g. an edited SIZES) are
refused in an existing OUT: pass another --out.
"""
from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # mocohub from this checkout when it is not installed

from mocohub.fileio import atomic_write  # noqa: E402
from mocohub.jsonlog import METRICS_NAME, append_jsonl, read_jsonl  # noqa: E402

# Every scale setting, in one place. lr: the `cifar` recipe's 0.06 at batch 512, scaled linearly with
# the batch. moco_k: the base queue (the queue study varies it over queue_ks, each a multiple of the batch
# and at most the number of training images; others are dropped with a note). train/val_per_class: the
# first N file names per class (None: all). knn_k: the kNN monitor's neighbours. workers: loader
# processes per run (None: mocohub's default).
SIZES: dict[str, dict[str, Any]] = {
    # about 15 minutes a study on 2 AMX cores (bf16; twice that in fp32 on an AVX2-only CPU): 5,000 images, 200
    # steps of 256, about 2 minutes a run. Sized by time alone, before any result was seen.
    "cpu": dict(train_per_class=500, val_per_class=100, image_size=32, arch="test_resnet", epochs=10,
                batch=256, lr=0.03, moco_k=4096, queue_ks=(256, 1024, 4096), knn_k=200, workers=None),
    # the official CIFAR-10 demo (recipe `cifar`): 50,000 + 10,000 images, ResNet-18 (3x3 stem), 200 epochs,
    # batch 512, lr 0.06, K 4096; 256 is no multiple of 512, 65536 exceeds the 50,000 images
    "full": dict(train_per_class=None, val_per_class=None, image_size=32, arch="resnet18", epochs=200,
                 batch=512, lr=0.06, moco_k=4096, queue_ks=(1024, 4096, 16384), knn_k=200, workers=None),
    # hidden (tests/test_ablations.py): seconds per run, nothing learnt
    "smoke": dict(train_per_class=8, val_per_class=2, image_size=8, arch="test_resnet", epochs=2,
                  batch=8, lr=0.03, moco_k=16, queue_ks=(8, 16), knn_k=10, workers=0),
}
PUBLIC_SIZES = ("cpu", "full")
CIFAR_PER_CLASS = {"train": 5000, "val": 1000}  # CIFAR-10's train and test sets, 10 classes
CIFAR_CLASSES = 10
TAR_NAME = "cifar10-jpg.tar.gz"
RESULTS_NAME = "results.jsonl"
RUN_LOG = "ablation.log"      # the run's stderr, appended over its invocations
RUN_MARK = "ablation.json"    # the run's flags and wall time so far
SUBSET_NAME = "SUBSET.json"
EXIT_DIVERGED = 3             # `mocohub train`: the loss became nan/inf


@dataclass
class Setting:
    name: str
    flags: dict[str, str]


@dataclass
class Study:
    name: str
    claim: str                    # what the paper says, next to which the result is read
    settings: list[Setting]
    notes: list[str] = field(default_factory=list)


def _study(name: str, size: dict[str, Any], n_train: int) -> Study:
    """The study's settings (flags on top of the base flags) for this size and data set."""
    batch = size["batch"]
    if name == "momentum":
        return Study(name, "He et al. 2020 (momentum ablation, ImageNet linear accuracy): m = 0 fails to train "
                           "(the loss oscillates), 0.9 is much worse, 0.99 to 0.9999 work, 0.999 is best",
                     [Setting(f"m{m}", {"--moco-m": m}) for m in ("0", "0.9", "0.99", "0.999")])
    if name == "shuffle-bn":
        # 8 BN statistic groups, as the official 8 GPUs (each normalising its own 32 images); on one device
        # the trainer splits the batch into 8 SplitBatchNorm groups (fewer if a group would drop below 32)
        notes = [] if batch // 8 >= 32 else [f"batch {batch}: fewer than 8 BN groups of 32 images, so the "
                                             "trainer uses fewer groups (1 group: the shuffle changes nothing)"]
        return Study(name, "He et al. 2020 (Shuffling BN, and its appendix): without Shuffle BN the pretext "
                           "accuracy climbs fast (the model cheats through the BN statistics of its sub-batch) "
                           "while the representation (kNN, linear) gets worse",
                     [Setting("shuffle-bn", {"--shuffle-bn": "true", "--bn-groups": "8"}),
                      Setting("no-shuffle-bn", {"--shuffle-bn": "false", "--bn-groups": "8"})], notes)
    if name == "queue":
        kept = [k for k in size["queue_ks"] if k % batch == 0 and k <= n_train]
        dropped = [k for k in size["queue_ks"] if k not in kept]
        notes = [f"K {', '.join(map(str, dropped))} dropped: K must be a multiple of the batch {batch} and at "
                 f"most the {n_train} training images"] if dropped else []
        return Study(name, "He et al. 2020 (the comparison of contrastive loss mechanisms over K): a larger "
                           "queue K gives better features, independent of the batch size",
                     [Setting(f"k{k}", {"--moco-k": str(k)}) for k in kept], notes)
    if name == "v1-v2":
        # The v1/v2 augmentations at 32 px: RandomResizedCrop(32, scale 0.2-1), jitter, grayscale, flip and, for
        # v2, a Gaussian blur of sigma 0.1-2.0 *pixels* (p 0.5). Made for 224-px crops, that blur is about 7x
        # stronger relative to a 32-px image (sigma 2 px here is like 14 px at 224) and wipes out much of a
        # CIFAR image: nonsensical at this size, but run as the paper's setting (aug+ = v1 aug + blur + p 0.8).
        return Study(name, "Chen et al. 2020 (MoCo v2's ablation): the MLP head, T 0.2 and the stronger "
                           "augmentation each improve on v1 (the released 200-epoch ResNet-50s: v1 60.6, v2 67.7 "
                           "ImageNet linear top-1)",
                     [Setting("v1", {"--mlp": "false", "--moco-t": "0.07", "--aug": "moco-v1"}),
                      Setting("v1+mlp", {"--mlp": "true", "--moco-t": "0.07", "--aug": "moco-v1"}),
                      Setting("v1+mlp+t0.2", {"--mlp": "true", "--moco-t": "0.2", "--aug": "moco-v1"}),
                      Setting("v2", {"--mlp": "true", "--moco-t": "0.2", "--aug": "moco-v2"})])
    if name == "symmetric":
        if size["moco_k"] % (2 * batch):
            raise SystemExit(f"symmetric study: --moco-k {size['moco_k']} must be divisible by twice the batch "
                             f"({2 * batch}); fix SIZES")
        return Study(name, "the official CIFAR-10 demo (kNN top-1, 200/400/800 epochs): asymmetric 82.6 / 86.3 / "
                           "88.7, symmetric 85.3 / 88.5 / 89.7 (the symmetric loss sees each pair twice)",
                     [Setting("asymmetric", {"--symmetric": "false"}), Setting("symmetric", {"--symmetric": "true"})])
    raise SystemExit(f"unknown study {name!r}")


STUDIES = ("momentum", "shuffle-bn", "queue", "v1-v2", "symmetric")


def base_flags(size: dict[str, Any]) -> dict[str, str]:
    flags = {"--recipe": "cifar", "--arch": size["arch"], "--stem": "cifar", "--image-size": str(size["image_size"]),
             "--epochs": str(size["epochs"]), "--batch-size": str(size["batch"]), "--lr": str(size["lr"]),
             "--moco-k": str(size["moco_k"]), "--knn-k": str(size["knn_k"]), "--knn-every": "1"}
    if size["workers"] is not None:
        flags["--workers"] = str(size["workers"])
    return flags


def flag_list(flags: dict[str, str]) -> list[str]:
    return [x for k, v in flags.items() for x in (k, str(v))]


# -- data ----------------------------------------------------------------------------------------------

def default_tar() -> Path | None:
    for candidate in (os.environ.get("CIFAR_TAR"), REPO.parent / "shared" / "data" / TAR_NAME,
                      REPO / ".cifar" / TAR_NAME):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _val_dir(folder: Path) -> Path | None:
    return next((folder / n for n in ("val", "test") if (folder / n).is_dir()), None)


def _images(folder: Path) -> dict[str, list[str]]:
    """class -> sorted file names (the folder's class sub-folders)."""
    return {c.name: sorted(p.name for p in c.iterdir() if p.is_file() and not p.name.startswith("."))
            for c in sorted(folder.iterdir()) if c.is_dir()}


def _subset_id(source: Path, size: dict[str, Any]) -> dict[str, Any]:
    return {"source": str(source.resolve()), "train_per_class": size["train_per_class"],
            "val_per_class": size["val_per_class"]}


def _check_subset(dest: Path, wanted: dict[str, Any]) -> bool:
    """True when DEST holds the wanted subset; refuse another one (the runs there were trained on it)."""
    mark = dest / SUBSET_NAME
    if not mark.exists():
        return False
    have = json.loads(mark.read_text())
    if {k: have.get(k) for k in ("train_per_class", "val_per_class")} != \
            {k: wanted[k] for k in ("train_per_class", "val_per_class")}:
        raise SystemExit(f"{dest} holds another subset ({have}), not {wanted}: pass another --out")
    return True


def extract_from_tar(tar: Path, dest: Path, size: dict[str, Any]) -> None:
    """Stream the archive once; write the first N file names (sorted) of each class of train/ and test/
    (as val/) into DEST, all of them where N is None. Written to DEST/.partial, then moved in place."""
    limits = {"train": size["train_per_class"], "test": size["val_per_class"]}
    kept: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    partial = dest / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    t0 = time.perf_counter()
    written = 0
    with tarfile.open(tar, "r:*") as archive:
        for member in archive:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in limits or \
                    any(p in ("", ".", "..") or p.startswith(".") for p in parts):
                continue
            split, cls, name = parts
            limit = limits[split]
            if limit is None:  # everything: write as it streams
                out = partial / ("val" if split == "test" else "train") / cls / name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(archive.extractfile(member).read())
                written += 1
                continue
            bucket = kept.setdefault((split, cls), [])
            if len(bucket) < limit or name < bucket[-1][0]:
                bisect.insort(bucket, (name, archive.extractfile(member).read()))
                del bucket[limit:]
    for (split, cls), files in kept.items():
        folder = partial / ("val" if split == "test" else "train") / cls
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files:
            (folder / name).write_bytes(data)
            written += 1
    for split in ("train", "val"):
        if not (partial / split).is_dir():
            raise SystemExit(f"{tar} has no {'test' if split == 'val' else 'train'}/<class>/ images")
        shutil.rmtree(dest / split, ignore_errors=True)
        (partial / split).rename(dest / split)
    partial.rmdir()
    print(f"data: {written} images from {tar} into {dest} ({time.perf_counter() - t0:.0f} s)", flush=True)


def link_subset(folder: Path, dest: Path, size: dict[str, Any]) -> None:
    """The first N names per class of an unpacked folder, hard-linked (copied across file systems)."""
    partial = dest / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    for split, src, limit in (("train", folder / "train", size["train_per_class"]),
                              ("val", _val_dir(folder), size["val_per_class"])):
        for cls, names in _images(src).items():
            (partial / split / cls).mkdir(parents=True, exist_ok=True)
            for name in names[:limit]:
                try:
                    os.link(src / cls / name, partial / split / cls / name)
                except OSError:
                    shutil.copy2(src / cls / name, partial / split / cls / name)
        shutil.rmtree(dest / split, ignore_errors=True)
        (partial / split).rename(dest / split)
    partial.rmdir()


def prepare_data(data: Path | None, out: Path, size: dict[str, Any], dry_run: bool) -> tuple[Path, Path, int]:
    """(train folder, val folder, number of training images); made once under OUT/data when needed."""
    source = data or default_tar()
    if source is None:
        raise SystemExit(f"no CIFAR-10 archive found: pass --data (the {TAR_NAME} archive or a folder with train/ "
                         "and val/ or test/), or set CIFAR_TAR")
    if not source.exists():
        raise SystemExit(f"--data {source}: no such file or folder")
    dest = out / "data"
    if source.is_dir():
        val = _val_dir(source)
        if not (source / "train").is_dir() or val is None:
            raise SystemExit(f"--data {source}: a folder needs train/ and val/ (or test/), one sub-folder per class")
        train_counts = {c: len(n) for c, n in _images(source / "train").items()}
        val_counts = {c: len(n) for c, n in _images(val).items()}
        limits = size["train_per_class"], size["val_per_class"]
        fits = all(limit is None or max(counts.values(), default=0) <= limit
                   for limit, counts in zip(limits, (train_counts, val_counts)))
        if fits:  # the folder as it is
            return source / "train", val, sum(train_counts.values())
        n_train = sum(min(n, limits[0] or n) for n in train_counts.values())
        if not dry_run and not _check_subset(dest, _subset_id(source, size)):
            link_subset(source, dest, size)
            atomic_write(dest / SUBSET_NAME, lambda p: Path(p).write_text(json.dumps(_subset_id(source, size))))
        return dest / "train", dest / "val", n_train
    if dry_run or _check_subset(dest, _subset_id(source, size)):
        if dry_run and not (dest / SUBSET_NAME).exists():
            per = lambda n: "all" if n is None else f"the first {n}"  # noqa: E731
            print(f"data: would stream {per(size['train_per_class'])} training and {per(size['val_per_class'])} "
                  f"test images per class from {source} into {dest}/train and {dest}/val", flush=True)
        if (dest / "train").is_dir():
            return dest / "train", dest / "val", sum(len(n) for n in _images(dest / "train").values())
        per_class = size["train_per_class"] or CIFAR_PER_CLASS["train"]
        return dest / "train", dest / "val", per_class * CIFAR_CLASSES
    dest.mkdir(parents=True, exist_ok=True)
    extract_from_tar(source, dest, size)
    atomic_write(dest / SUBSET_NAME, lambda p: Path(p).write_text(json.dumps(_subset_id(source, size))))
    return dest / "train", dest / "val", sum(len(n) for n in _images(dest / "train").values())


# -- runs ----------------------------------------------------------------------------------------------

@dataclass
class Run:
    study: str
    setting: Setting
    seed: int
    flags: dict[str, str]     # every train flag but the paths
    run_dir: Path

    @property
    def label(self) -> str:
        return f"{self.study} {self.setting.name} seed {self.seed}"

    def command(self, train: Path, val: Path) -> list[str]:
        return [sys.executable, "-m", "mocohub", "train", str(train), *flag_list(self.flags), "--val", str(val),
                "--out", str(self.run_dir), "--no-progress", "--json"]


def final_rows(run: Run, epochs: int) -> list[dict[str, Any]] | None:
    """The run's metrics.jsonl rows when its final epoch is there, else None."""
    rows = read_jsonl(run.run_dir / METRICS_NAME)
    return rows if any(r.get("epoch") == epochs - 1 for r in rows) else None


def _machine() -> dict[str, Any]:
    import torch
    info = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


PRECISION_LINE = re.compile(r"^precision (\S+) \((.*)\), (\S+)\s*$", re.M)


def result_row(run: Run, size_name: str, epochs: int, status: str, machine: dict[str, Any],
               error: str | None = None) -> dict[str, Any]:
    rows = sorted((r for r in read_jsonl(run.run_dir / METRICS_NAME) if "epoch" in r), key=lambda r: r["epoch"])
    mark = _read_mark(run)
    log = (run.run_dir / RUN_LOG).read_text() if (run.run_dir / RUN_LOG).exists() else ""
    found = PRECISION_LINE.findall(log)
    last = rows[-1] if rows and status == "done" else {}
    return {
        "study": run.study, "setting": run.setting.name, "setting_flags": run.setting.flags, "seed": run.seed,
        "size": size_name, "status": status, "error": error, "epochs": epochs, "epochs_done": len(rows),
        "final_knn_top1": last.get("knn_top1"), "final_knn_top5": last.get("knn_top5"),
        "final_acc1": last.get("acc1"), "final_loss": last.get("loss"),
        "curves": {key: [r.get(key) for r in rows] for key in ("epoch", "loss", "acc1", "knn_top1", "lr")},
        "train_seconds": sum(r.get("seconds", 0.0) for r in rows), "wall_seconds": mark.get("wall_seconds"),
        "resumed": "resumed from" in log, "precision": found[-1][0] if found else None,
        "precision_why": found[-1][1] if found else None, "memory_format": found[-1][2] if found else None,
        **machine, "flags": run.flags, "run_dir": str(run.run_dir),
    }


def _read_mark(run: Run) -> dict[str, Any]:
    path = run.run_dir / RUN_MARK
    return json.loads(path.read_text()) if path.exists() else {}


def _write_mark(run: Run, wall_seconds: float) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"flags": run.flags, "wall_seconds": wall_seconds})
    atomic_write(run.run_dir / RUN_MARK, lambda p: Path(p).write_text(text))


def _check_mark(run: Run) -> None:
    mark = _read_mark(run)
    if mark and mark.get("flags") != run.flags:
        raise SystemExit(f"{run.run_dir} was trained with other flags ({shlex.join(flag_list(mark['flags']))}); "
                         "the study's settings changed since: pass another --out")


def launch(run: Run, train: Path, val: Path) -> tuple[int, str]:
    """Run one `mocohub train`; its stderr goes to RUN_DIR/ablation.log, epoch lines also here.
    Returns (exit code, last error line). Ctrl-C: the trainer checkpoints; we wait for it, then stop."""
    cmd = run.command(train, val)
    before = _read_mark(run).get("wall_seconds", 0.0)
    _write_mark(run, before)
    t0 = time.perf_counter()
    last_error = ""
    with open(run.run_dir / RUN_LOG, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        # its own session: a Ctrl-C reaches this script only, which passes one SIGINT on (a second one would
        # stop the trainer without its checkpoint)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                start_new_session=True)
        try:
            for line in proc.stderr:
                log.write(line)
                log.flush()
                if line.startswith(("epoch ", "resumed from")):
                    print("    " + line.rstrip(), flush=True)
                elif "error" in line.lower():
                    last_error = line.strip()
            proc.stdout.read()
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
            _write_mark(run, before + time.perf_counter() - t0)
            raise
    _write_mark(run, before + time.perf_counter() - t0)
    return proc.returncode, last_error


# -- report --------------------------------------------------------------------------------------------

def _seconds(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {(max(values) - min(values)) / 2:.1f} [{min(values):.1f}..{max(values):.1f}]"


def write_report(study: Study, rows: list[dict[str, Any]], study_dir: Path, size_name: str, base: dict[str, str],
                 n_train: int, n_val: int, seeds: int) -> Path:
    machine = rows[0] if rows else {}
    precisions = sorted({f"{r['precision']} ({r['memory_format']})" for r in rows if r.get("precision")})
    lines = [f"# Ablation: {study.name} (size {size_name})", "",
             f"Claim: {study.claim}.", "",
             f"Base: `mocohub train TRAIN {shlex.join(flag_list(base))} --val VAL --seed S`, {n_train} training "
             f"images, kNN monitor (k {base['--knn-k']}, t 0.1) on {n_val} held-out images; {seeds} seeds per "
             f"setting.", "",
             f"Machine: CPU capability {machine.get('cpu_capability')}"
             + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
             + f", torch {machine.get('torch')}, OMP_NUM_THREADS {machine.get('omp_num_threads')}; precision "
             + (", ".join(precisions) or "n/a") + ".", ""]
    lines += [f"Note: {n}." for n in study.notes] + ([""] if study.notes else [])
    lines += ["| setting | flags | kNN top-1 (%), final: mean ± half-range [min..max] | pretext (instance) "
              "accuracy (%), final | train seconds per run | runs |", "|---|---|---|---|---|---|"]
    for setting in study.settings:
        mine = [r for r in rows if r["setting"] == setting.name]
        done = [r for r in mine if r["status"] == "done"]
        runs = f"{len(done)}/{len(mine)}" + (f" ({len(mine) - len(done)} diverged)"
                                              if any(r["status"] == "diverged" for r in mine) else "")
        seconds = statistics.fmean(r["train_seconds"] for r in mine) if mine else float("nan")
        lines.append(f"| {setting.name} | `{' '.join(flag_list(setting.flags))}` | "
                     f"{_spread([r['final_knn_top1'] for r in done if r['final_knn_top1'] is not None])} | "
                     f"{_spread([r['final_acc1'] for r in done if r['final_acc1'] is not None])} | "
                     f"{_seconds(seconds)} | {runs} |")
    lines += ["", f"![{study.name}]({study.name}.png)", ""]
    text = "\n".join(lines)
    return atomic_write(study_dir / f"{study.name}.md", lambda p: Path(p).write_text(text))


def plot_study(study: Study, rows: list[dict[str, Any]], png: Path, size_name: str, seeds: int,
               classes: int) -> Path:
    """Two panels (kNN top-1, pretext accuracy per epoch): per setting the mean over seeds, min..max shaded."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise SystemExit("the plot needs matplotlib: pip install 'mocohub[plot]'") from None
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    panels = (("knn_top1", "kNN top-1 on held-out images"), ("acc1", "Pretext (instance) accuracy"))
    for ax, (key, title) in zip(axes, panels):
        for i, setting in enumerate(study.settings):
            curves = [[v for v in r["curves"][key]] for r in rows if r["setting"] == setting.name]
            n = max((len(c) for c in curves), default=0)
            xs, mean, lo, hi = [], [], [], []
            for e in range(n):
                values = [c[e] for c in curves if e < len(c) and c[e] is not None and math.isfinite(c[e])]
                if values:
                    xs.append(e + 1)
                    mean.append(statistics.fmean(values))
                    lo.append(min(values))
                    hi.append(max(values))
            if not xs:
                continue
            colour = f"C{i % 10}"
            ax.plot(xs, mean, color=colour, marker="o", markersize=3.5, linewidth=1.5,
                    label=f"{setting.name} ({len(curves)} seed{'s' * (len(curves) != 1)})")
            ax.fill_between(xs, lo, hi, color=colour, alpha=0.18, linewidth=0)
        if key == "knn_top1" and classes:
            ax.axhline(100 / classes, color="0.5", linestyle="--", linewidth=1)
            ax.annotate(f"chance ({100 / classes:.0f} %)", (0.01, 100 / classes), xycoords=("axes fraction", "data"),
                        xytext=(0, 3), textcoords="offset points", color="0.4", fontsize=8)
        ax.set_title(title, fontsize=11)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncols=min(4, len(handles)), frameon=False)
    fig.suptitle(f"MoCo ablation: {study.name} (size {size_name}; line: mean over {seeds} seeds, shaded: "
                 "min..max)", fontsize=12)
    return atomic_write(png, lambda p: fig.savefig(p, format="png", dpi=110))


# -- main ----------------------------------------------------------------------------------------------

def run_study(name: str, args: argparse.Namespace, size: dict[str, Any], train: Path, val: Path, n_train: int,
              machine: dict[str, Any]) -> None:
    study = _study(name, size, n_train)
    if args.settings:
        unknown = set(args.settings) - {s.name for s in study.settings}
        if unknown:
            raise SystemExit(f"{name}: no setting {', '.join(sorted(unknown))}; its settings: "
                             f"{', '.join(s.name for s in study.settings)}")
        study.settings = [s for s in study.settings if s.name in args.settings]
    if not study.settings:
        raise SystemExit(f"{name}: no setting fits this data set ({'; '.join(study.notes)})")
    base = base_flags(size)
    study_dir = args.out / name
    runs = [Run(name, s, seed, {**base, **s.flags, "--seed": str(seed)}, study_dir / "runs" / f"{s.name}-seed{seed}")
            for s in study.settings for seed in range(args.seeds)]
    print(f"== {name}: {len(study.settings)} settings x {args.seeds} seeds = {len(runs)} runs -> {study_dir}",
          flush=True)
    for note in study.notes:
        print(f"   note: {note}", flush=True)
    results = study_dir / RESULTS_NAME
    recorded = {(r["setting"], r["seed"]): r for r in read_jsonl(results)}
    epochs = size["epochs"]
    for i, run in enumerate(runs, 1):
        head = f"[{i}/{len(runs)}] {run.label}"
        row = recorded.get((run.setting.name, run.seed))
        if args.dry_run:
            state = "skipped (done)" if row or final_rows(run, epochs) else \
                ("would resume" if (run.run_dir / "checkpoint.pth.tar").exists() else "would run")
            print(f"{head}: {state}\n    {shlex.join(run.command(train, val))}", flush=True)
            continue
        _check_mark(run)
        if row is not None:
            if row.get("flags") != run.flags:
                raise SystemExit(f"{results} has {run.label} with other flags: the study's settings changed "
                                 "since: pass another --out")
            print(f"{head}: skipped ({row['status']}: {_summary(row)})", flush=True)
            continue
        if final_rows(run, epochs) is None:
            print(f"{head}: training ({' '.join(flag_list(run.setting.flags))})", flush=True)
            code, error = launch(run, train, val)
            if code == EXIT_DIVERGED:
                row = result_row(run, args.size, epochs, "diverged", machine, error)
            elif code != 0 or final_rows(run, epochs) is None:
                raise SystemExit(f"{run.label} failed (exit {code}): {error or 'see the log'}; its output is in "
                                 f"{run.run_dir / RUN_LOG} (the same command resumes it)")
        else:
            print(f"{head}: finished earlier, recording it", flush=True)
        row = row or result_row(run, args.size, epochs, "done", machine)
        append_jsonl(results, [row])
        recorded[(run.setting.name, run.seed)] = row
        print(f"{head}: {row['status']}: {_summary(row)}", flush=True)
    if args.dry_run:
        return
    rows = [recorded[(r.setting.name, r.seed)] for r in runs]
    val_images = _images(val)
    md = write_report(study, rows, study_dir, args.size, base, n_train, sum(map(len, val_images.values())), args.seeds)
    png = plot_study(study, rows, study_dir / f"{name}.png", args.size, args.seeds, len(val_images))
    print("\n".join(line for line in md.read_text().splitlines() if line.startswith("|")))
    print(f"== {name}: {md} and {png}", flush=True)


def _summary(row: dict[str, Any]) -> str:
    if row["status"] != "done":
        return f"after {row['epochs_done']} epochs ({row.get('error') or 'no message'})"
    return (f"kNN top-1 {row['final_knn_top1']:.1f} %, pretext accuracy {row['final_acc1']:.1f} %, "
            f"{_seconds(row['train_seconds'])} s training, {_seconds(row['wall_seconds'] or 0)} s in all")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
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
    args = p.parse_args(argv)
    if args.seeds < 2:
        p.error("--seeds: at least 2 (the table and plot show the spread over seeds)")
    args.out = args.out or Path("runs") / f"ablations-{args.size}"
    size = {**SIZES[args.size], **({"epochs": args.epochs} if args.epochs else {})}
    train, val, n_train = prepare_data(args.data, args.out, size, args.dry_run)
    machine = {} if args.dry_run else _machine()
    if machine:
        print(f"machine: CPU capability {machine['cpu_capability']}"
              + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
              + f", OMP_NUM_THREADS {machine['omp_num_threads']}; data {train} ({n_train} images), {val}", flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C: the running trainer checkpoints first
    try:
        for name in STUDIES if args.study == "all" else (args.study,):
            run_study(name, args, size, train, val, n_train, machine)
    except KeyboardInterrupt:
        print("interrupted: run the same command to resume (finished runs are skipped)", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
