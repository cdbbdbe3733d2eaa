"""Training curves of one or several runs as one PNG: loss, instance accuracy, lr and kNN top-1.

matplotlib is optional (``pip install mocohub[plot]``). Figures are drawn on an Agg canvas of their
own, never through pyplot, so plotting from a training loop or a notebook changes no global state.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

from .errors import MocohubError
from .fileio import atomic_write
from .jsonlog import read_jsonl
from .run_folder import CURVES, METRICS, STEPS, RunFolder

__all__ = ["CURVES_NAME", "PLOT_INSTALL", "RunCurves", "read_run", "plot_runs", "plot_groups", "write_curves"]

CURVES_NAME = CURVES  # the name other modules import
PLOT_INSTALL = "pip install 'mocohub[plot]' (or pip install matplotlib)"

# (key, panel title, y label); loss, acc1 and lr come from steps.jsonl (else metrics.jsonl).
_PANELS = (
    ("loss", "InfoNCE loss", "loss"),
    ("acc1", "Instance accuracy (positive key ranked first)", "top-1 (%)"),
    ("lr", "Learning rate", "lr"),
    ("knn_top1", "kNN top-1 on the val folder (query encoder output)", "top-1 (%)"),
)


class RunCurves(NamedTuple):
    """The logs of one run folder; ``steps_per_epoch`` is known once an epoch has completed."""

    name: str
    steps: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    steps_per_epoch: int | None


def _steps_per_epoch(steps: list[dict[str, Any]], epochs: list[dict[str, Any]]) -> int | None:
    """The last step of a completed epoch e is (e + 1) * steps_per_epoch - 1 (intervals end there)."""
    done = {row["epoch"] for row in epochs}
    ends = [(row["step"] + 1) / (row["epoch"] + 1) for row in steps if row.get("epoch") in done]
    return round(max(ends)) if ends else None


def read_run(run_dir: str | os.PathLike, name: str | None = None) -> RunCurves:
    """Both logs of ``run_dir``; a folder with neither is refused (it is not a training run)."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    steps, epochs = read_jsonl(folder.steps), read_jsonl(folder.metrics)
    if not steps and not epochs:
        raise MocohubError(f"{run_dir} has no {STEPS} or {METRICS} yet: pass the folder of a "
                           "`mocohub train` run (its --out)")
    steps = [r for r in steps if "step" in r and "epoch" in r]
    return RunCurves(name or run_dir.resolve().name, steps, epochs, _steps_per_epoch(steps, epochs))


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    """Folder names, with more of the path where two runs share a name."""
    parts = [p.resolve().parts for p in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in run_dirs]


def _series(run: RunCurves, key: str, by_step: bool) -> tuple[list[float], list[float], bool]:
    """x, y and whether the points are per epoch (drawn with markers) for one panel of one run."""
    spe = run.steps_per_epoch
    if key != "knn_top1" and run.steps:
        rows = [r for r in run.steps if r.get(key) is not None]
        xs = [(r["step"] + 1) if by_step else (r["step"] + 1) / spe for r in rows]
        return xs, [r[key] for r in rows], False
    rows = [r for r in run.epochs if r.get(key) is not None and (spe or not by_step)]
    xs = [(r["epoch"] + 1) * spe if by_step else r["epoch"] + 1 for r in rows]
    return xs, [r[key] for r in rows], True


def _new_figure(width: float, height: float):
    """A figure on an Agg canvas of its own (no pyplot state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MocohubError(f"plotting needs matplotlib: {PLOT_INSTALL}", exit_code=1) from None
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _figure(runs: Sequence[RunCurves]):
    # Steps on x only while some run has not finished an epoch (its steps/epoch is unknown).
    by_step = any(run.steps and run.steps_per_epoch is None for run in runs)
    fig = _new_figure(11, 7.5)
    axes = fig.subplots(2, 2, sharex=True)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (key, title, ylabel) in zip(axes.flat, _PANELS):
        drawn = False
        for run, colour in zip(runs, colours):
            xs, ys, per_epoch = _series(run, key, by_step)
            if xs:
                ax.plot(xs, ys, color=colour, label=run.name, linewidth=1.4,
                        marker="o" if per_epoch else None, markersize=4)
                drawn = True
        ax.set_title(title, fontsize=11)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if not drawn:
            hint = "no kNN score yet\n(the monitor runs with --val DIR)" if key == "knn_top1" else "not logged"
            ax.text(0.5, 0.5, hint, ha="center", va="center", transform=ax.transAxes, color="0.4")
            ax.set_yticks([])
    for ax in axes[1]:
        ax.set_xlabel("step" if by_step else "epoch")
        ax.tick_params(labelbottom=True)
    if len(runs) > 1:
        handles, names = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside lower center", ncols=min(4, len(runs)), frameon=False)
        fig.suptitle(f"MoCo training: {len(runs)} runs", fontsize=13)
    else:
        run = runs[0]
        epochs = f", {len(run.epochs)} epoch{'s' * (len(run.epochs) != 1)} done" if run.epochs else ""
        fig.suptitle(f"MoCo training: {run.name}{epochs}", fontsize=13)
    return fig


def _save(fig, out_png: str | os.PathLike) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def plot_runs(run_dirs: Sequence[str | os.PathLike], out_png: str | os.PathLike) -> Path:
    """Draw every run of ``run_dirs`` into ``out_png`` (legend: the run folder names)."""
    if not run_dirs:
        raise MocohubError("no run folder given")
    paths = [Path(p) for p in run_dirs]
    return _save(_figure([read_run(p, name) for p, name in zip(paths, _labels(paths))]), out_png)


def write_curves(run_dir: str | os.PathLike, out_png: str | os.PathLike | None = None) -> Path | None:
    """Refresh ``run_dir/curves.png`` (or ``out_png``); None, silently, without matplotlib or any
    logged row yet, so a training loop can call it every epoch whatever is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    try:
        run = read_run(run_dir)
    except MocohubError:  # nothing logged yet
        return None
    return _save(_figure([run]), out_png or RunFolder(run_dir).curves)


def _spread(runs: Sequence[Sequence[Mapping[str, Any]]], key: str) -> tuple[list[int], list[list[float]]]:
    """Per epoch (counted from 1) the finite values of ``key`` over ``runs`` (their epoch rows)."""
    by_epoch: dict[int, list[float]] = {}
    for rows in runs:
        for row in rows:
            value = row.get(key)
            if value is not None and math.isfinite(value):
                by_epoch.setdefault(row["epoch"] + 1, []).append(value)
    epochs = sorted(by_epoch)
    return epochs, [by_epoch[e] for e in epochs]


def plot_groups(groups: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], out_png: str | os.PathLike, *,
                title: str, keys: Sequence[str] = ("knn_top1", "acc1"), chance: float | None = None) -> Path:
    """Runs in groups (a setting's seeds, say), each run as its metrics.jsonl rows: one panel per key,
    per group the mean over its runs at each epoch with their min..max shaded; ``chance`` (a top-1 %)
    as a dashed line on the kNN panel."""
    titles = {key: (heading, ylabel) for key, heading, ylabel in _PANELS}
    fig = _new_figure(5.5 * len(keys), 4.6)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        drawn = False
        for i, (name, runs) in enumerate(groups.items()):
            epochs, values = _spread(runs, key)
            if not epochs:
                continue
            drawn = True
            colour = f"C{i % 10}"
            ax.plot(epochs, [sum(v) / len(v) for v in values], color=colour, marker="o", markersize=3.5,
                    linewidth=1.5, label=f"{name} ({len(runs)} run{'s' * (len(runs) != 1)})")
            ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.18,
                            linewidth=0)
        if not drawn:
            ax.text(0.5, 0.5, "no epoch logged", ha="center", va="center", transform=ax.transAxes, color="0.4")
        elif key == "knn_top1" and chance is not None:
            ax.axhline(chance, color="0.5", linestyle="--", linewidth=1)
            ax.annotate(f"chance ({chance:.0f} %)", (0.01, chance), xycoords=("axes fraction", "data"),
                        xytext=(0, 3), textcoords="offset points", color="0.4", fontsize=8)
        ax.set_title(titles[key][0], fontsize=11)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch")
        ax.set_ylabel(titles[key][1])
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncols=min(4, len(handles)), frameon=False)
    fig.suptitle(title, fontsize=12)
    return _save(fig, out_png)
