"""A study's results: one row per run, read from its run folder (metrics.jsonl, run.json), and the
table and plot drawn from those rows alone, so a report can be rebuilt from results.jsonl."""
from __future__ import annotations

import json
import os
import shlex
import statistics
from pathlib import Path
from typing import Any

from ablation_studies import Flags, Setting, flag_list
from mocohub.fileio import atomic_write
from mocohub.jsonlog import read_jsonl
from mocohub.plotting import plot_groups
from mocohub.run_folder import RunFolder
from mocohub.training.record import read_record

__all__ = ["RESULTS_NAME", "MARK_NAME", "CURVE_KEYS", "machine", "result_row", "summary", "write_report",
           "plot_study"]

RESULTS_NAME = "results.jsonl"
MARK_NAME = "ablation.json"  # the ablation's own bookkeeping of a run: wall seconds and launches so far
CURVE_KEYS = ("epoch", "loss", "acc1", "knn_top1", "lr")
RECORD_KEYS = ("precision", "precision_why", "memory_format", "device", "aug_impl", "workers", "bn_splits")


def machine() -> dict[str, Any]:
    """What the run's record does not say: the CPU's vector capability, threads, the GPU."""
    import torch
    info = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def result_row(run_dir: Path, *, study: str, setting: Setting, seed: int, flags: Flags, size: str, epochs: int,
               status: str, machine_info: dict[str, Any], error: str | None = None) -> dict[str, Any]:
    """The run's row of results.jsonl: its epochs (metrics.jsonl), its start choices (run.json)."""
    folder = RunFolder(run_dir)
    rows = sorted((r for r in read_jsonl(folder.metrics) if r.get("epoch", epochs) < epochs), key=lambda r: r["epoch"])
    record = read_record(folder.record)
    mark = json.loads((run_dir / MARK_NAME).read_text()) if (run_dir / MARK_NAME).exists() else {}
    last = rows[-1] if rows and status == "done" else {}
    return {
        "study": study, "setting": setting.name, "setting_flags": setting.flags, "seed": seed, "size": size,
        "status": status, "error": error, "epochs": epochs, "epochs_done": len(rows),
        "final_knn_top1": last.get("knn_top1"), "final_knn_top5": last.get("knn_top5"),
        "final_acc1": last.get("acc1"), "final_loss": last.get("loss"),
        "curves": {key: [r.get(key) for r in rows] for key in CURVE_KEYS},
        "train_seconds": sum(r.get("seconds", 0.0) for r in rows), "wall_seconds": mark.get("wall_seconds"),
        "resumed": mark.get("launches", 1) > 1, **{k: record.get(k) for k in RECORD_KEYS},
        **machine_info, "flags": flags, "run_dir": str(run_dir),
    }


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def summary(row: dict[str, Any]) -> str:
    if row["status"] != "done":
        return f"after {row['epochs_done']} epochs ({row.get('error') or 'no message'})"
    return (f"kNN top-1 {row['final_knn_top1']:.1f} %, pretext accuracy {row['final_acc1']:.1f} %, "
            f"{_seconds(row['train_seconds'])} s training, {_seconds(row['wall_seconds'] or 0)} s in all")


def _spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {(max(values) - min(values)) / 2:.1f} [{min(values):.1f}..{max(values):.1f}]"


def _finals(rows: list[dict[str, Any]], key: str) -> str:
    return _spread([r[key] for r in rows if r["status"] == "done" and r[key] is not None])


def write_report(path: Path, rows: list[dict[str, Any]], *, study: str, claim: str, settings: list[Setting],
                 notes: list[str], size: str, base: Flags, n_train: int, n_val: int, seeds: int) -> Path:
    """The study's table (mean and spread over seeds per setting) as markdown, the plot linked."""
    first = rows[0] if rows else {}
    precisions = sorted({f"{r['precision']} ({r['memory_format']})" for r in rows if r.get("precision")})
    lines = [f"# Ablation: {study} (size {size})", "", f"Claim: {claim}.", "",
             f"Base: `mocohub train TRAIN {shlex.join(flag_list(base))} --val VAL --seed S`, {n_train} training "
             f"images, kNN monitor (k {base['--knn-k']}, t 0.1) on {n_val} held-out images; {seeds} seeds per "
             "setting.", "",
             f"Machine: CPU capability {first.get('cpu_capability')}"
             + (f", GPU {first['gpu']}" if first.get("gpu") else "")
             + f", torch {first.get('torch')}, OMP_NUM_THREADS {first.get('omp_num_threads')}; precision "
             + (", ".join(precisions) or "n/a") + ".", ""]
    lines += [f"Note: {n}." for n in notes] + ([""] if notes else [])
    lines += ["| setting | flags | kNN top-1 (%), final: mean ± half-range [min..max] | pretext (instance) "
              "accuracy (%), final | train seconds per run | runs |", "|---|---|---|---|---|---|"]
    for setting in settings:
        mine = [r for r in rows if r["setting"] == setting.name]
        done = sum(r["status"] == "done" for r in mine)
        runs = f"{done}/{len(mine)}" + (f" ({len(mine) - done} diverged)" if done < len(mine) else "")
        seconds = statistics.fmean(r["train_seconds"] for r in mine) if mine else float("nan")
        lines.append(f"| {setting.name} | `{' '.join(flag_list(setting.flags))}` | {_finals(mine, 'final_knn_top1')} | "
                     f"{_finals(mine, 'final_acc1')} | {_seconds(seconds)} | {runs} |")
    lines += ["", f"![{study}]({study}.png)", ""]
    text = "\n".join(lines)
    return atomic_write(path, lambda p: Path(p).write_text(text))


def plot_study(path: Path, rows: list[dict[str, Any]], *, study: str, settings: list[Setting], size: str,
               seeds: int, classes: int) -> Path:
    """kNN top-1 and pretext accuracy per epoch: per setting the mean over seeds, min..max shaded."""
    groups = {s.name: [[dict(zip(r["curves"], values)) for values in zip(*r["curves"].values())]
                       for r in rows if r["setting"] == s.name] for s in settings}
    return plot_groups(groups, path, chance=100 / classes if classes else None,
                       title=f"MoCo ablation: {study} (size {size}; line: mean over {seeds} seeds, shaded: min..max)")
