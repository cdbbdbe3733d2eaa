"""``--time-budget``: the duration flag, the planner (a table), the schedule stretched onto the plan,
a real budgeted run that ends near its budget with the lr at its final value, a probe that leaves no
trace in the run, a resumed run that keeps its plan, and two gloo ranks that plan the same epochs."""
import json
import math
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mocohub.cli.main import main
from mocohub.data.synthetic import make_dataset
from mocohub.errors import MocohubError
from mocohub.training import TrainConfig, Trainer, train
from mocohub.training.budget import (DRIFT_MARGIN, STEP_SECONDS_ENV, fit_schedule, make_plan, parse_duration,
                                     plan_epochs, plan_line)
from mocohub.training.optim import scaled_lr, v3_lr, v3_momentum

TINY = dict(image_size=16, batch_size=8, moco_k=8, workers=0, progress=False, log_every=1, arch="test_resnet",
            precision="fp32")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 images: 5 steps of 8 per epoch, so a few seconds hold several epochs."""
    train_dir, _ = make_dataset(tmp_path_factory.mktemp("data"), train_per_class=4, val_per_class=0, size=16)
    return str(train_dir)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("6h", 21600), ("1h30m", 5400),
                                           ("1h30m15s", 5415), ("2.5m", 150), (" 45S ", 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "90", "30 min", "m", "1m1h", "0s", "-5m", "1d"])
def test_a_duration_without_units_or_in_another_order_is_refused(text):
    with pytest.raises(MocohubError, match="--time-budget .*(90s, 30m|more than 0)"):
        parse_duration(text)


@pytest.mark.parametrize("budget, kw, epochs", [
    (100, dict(step_s=1, steps_per_epoch=10), 10),                                   # 10 epochs of 10 s
    (99.9, dict(step_s=1, steps_per_epoch=10), 9),
    (100, dict(step_s=1, steps_per_epoch=10, fixed_s=25), 7),                         # 25 + 70
    (100, dict(step_s=1, steps_per_epoch=10, epoch_s=2.5), 8),                        # 8 x 12.5
    (100, dict(step_s=1, steps_per_epoch=10, knn_s=5, knn_every=1), 6),               # 6 x 15 = 90, 7 x 15 = 105
    (99, dict(step_s=1, steps_per_epoch=10, knn_s=5, knn_every=2), 7),                # 70 + 4 passes = 90; 8: 100
    (100, dict(step_s=1, steps_per_epoch=10, knn_s=5, knn_every=2), 8),               # 80 + 4 passes = 100
    (100, dict(step_s=1, steps_per_epoch=10, knn_s=5, knn_every=3), 8),               # 80 + 3 passes = 95; 9: 105
    (5, dict(step_s=1, steps_per_epoch=10), 1),                                       # too short: at least one
    (5, dict(step_s=1, steps_per_epoch=10, fixed_s=50), 1),
    (3600, dict(step_s=0.12, steps_per_epoch=3125, knn_s=30, knn_every=2, fixed_s=60), 9),
])
def test_plan_epochs(budget, kw, epochs):
    assert plan_epochs(budget, **kw) == epochs


@pytest.mark.parametrize("recipe, epochs, lr_steps, warmup", [
    ("moco-v1", 10, (6, 8), 0),        # 120 and 160 of 200
    ("moco-v1", 1, (1,), 0),
    ("moco-v3", 30, (), 3),            # 10 of 100
    ("moco-v3-vit", 15, (), 2),        # 40 of 300
    ("moco-v3", 1, (), 0),             # the warmup stays below the run
])
def test_the_schedule_keeps_its_shares_over_the_planned_epochs(recipe, epochs, lr_steps, warmup):
    cfg = fit_schedule(TrainConfig.from_recipe(recipe), epochs)
    assert (cfg.epochs, cfg.lr_steps, cfg.warmup_epochs) == (epochs, lr_steps, warmup)


def test_the_start_line_says_the_plan_in_rounded_human_units():
    plan = dict(budget_s=1800, epochs=14, steps_per_epoch=3125, step_s=0.1234, knn_every=2)
    assert plan_line(plan) == "budget 30 min: 14 epochs of 3,125 steps at 0.12 s/step, kNN every 2 epochs"
    assert plan_line({**plan, "budget_s": 5400, "epochs": 1, "knn_every": None}) == \
        "budget 1 h 30 min: 1 epoch of 3,125 steps at 0.12 s/step"
    # the one epoch every run trains, past a short budget: 10 s start-up + 3,125 x 0.1234 + 2 + 40 s kNN
    short = {**plan, "budget_s": 90, "epochs": 1, "knn_every": 1, "fixed_s": 10.0, "epoch_s": 2.0, "knn_s": 40.0}
    assert plan_line(short) == ("budget 1 min 30 s: 1 epoch of 3,125 steps at 0.12 s/step, kNN every epoch; one epoch "
                                "takes about 7 min 18 s, longer than the budget (--max-steps N stops after N steps)")


def test_epochs_with_a_time_budget_is_refused_before_anything_is_written(data, tmp_path, capsys):
    assert main(["train", data, "--epochs", "5", "--time-budget", "30m", "--out", str(tmp_path / "run")]) == 2
    assert "--epochs and --time-budget" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(MocohubError, match="--epochs and --time-budget"):
        TrainConfig.from_recipe("cifar", epochs=5, time_budget=60)


def test_a_budget_of_seconds_ends_near_it_with_the_schedule_at_its_end_and_no_trace_of_the_probe(data, tmp_path):
    """Timed on a shared machine: the end within 50 % of the budget, plus the probe."""
    budget, threads = 12.0, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.monotonic()
        train(TrainConfig.from_recipe("cifar", data=data, out=str(tmp_path / "budget"), time_budget=budget,
                                      lr_per_iteration=True, **TINY))
        elapsed = time.monotonic() - start
        plan = json.loads((tmp_path / "budget" / "run.json").read_text())["plan"]
        epochs, steps = plan["epochs"], plan["epochs"] * plan["steps_per_epoch"]
        # the same run told its epochs: the probe changed nothing (weights, queue, RNG, optimiser)
        train(TrainConfig.from_recipe("cifar", data=data, out=str(tmp_path / "epochs"), epochs=epochs,
                                      lr_per_iteration=True, **TINY))
    finally:
        torch.set_num_threads(threads)
    assert elapsed < 1.5 * budget + plan["probe_s"]
    if epochs > 1:  # the budget was used, not just the one epoch a slow machine gets
        assert elapsed > 0.5 * budget
    rows = _rows(tmp_path / "budget" / "steps.jsonl")
    assert len(_rows(tmp_path / "budget" / "metrics.jsonl")) == epochs
    assert [r["step"] for r in rows] == list(range(steps))
    peak = rows[0]["lr"]  # the per-iteration cosine's first step is at its peak
    assert rows[-1]["lr"] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * (steps - 1) / steps)))
    assert rows[-1]["lr"] < 0.03 * peak or steps < 20
    assert [r["loss"] for r in rows] == [r["loss"] for r in _rows(tmp_path / "epochs" / "steps.jsonl")]


def test_the_plan_keeps_five_percent_of_the_budget_for_drift(monkeypatch):
    monkeypatch.setenv(STEP_SECONDS_ENV, "1")
    plan = make_plan(TrainConfig.from_recipe("cifar", time_budget=100), 1, None, spent_s=0.0, probe_s=0.0)
    assert plan["epochs"] == 95 == int(100 * (1 - DRIFT_MARGIN)) and plan["budget_s"] == 100


def test_a_resumed_budgeted_run_keeps_its_plan_and_ends_where_the_whole_run_does(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(STEP_SECONDS_ENV, "0.2")  # 3.2 s less 5 % of 1 s epochs: 3 epochs, 15 steps
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(TrainConfig.from_recipe("cifar", data=data, out=str(whole), time_budget=3.2, **TINY))
    train(TrainConfig.from_recipe("cifar", data=data, out=str(cut), time_budget=3.2, max_steps=7, **TINY))
    capsys.readouterr()
    # another budget (and a faster machine) on resume: the plan is the checkpoint's
    monkeypatch.setenv(STEP_SECONDS_ENV, "0.1")
    train(TrainConfig.from_recipe("cifar", data=data, out=str(cut), time_budget=60, **TINY))
    assert "keeps its plan (budget 3 s: 3 epochs of 5 steps" in capsys.readouterr().out
    whole_rows, cut_rows = _rows(whole / "steps.jsonl"), _rows(cut / "steps.jsonl")
    assert len(whole_rows) == 15 and [r["loss"] for r in cut_rows] == [r["loss"] for r in whole_rows]
    assert [r["lr"] for r in cut_rows] == [r["lr"] for r in whole_rows]
    assert json.loads((cut / "run.json").read_text())["plan"]["epochs"] == 3


def test_a_v3_budget_spans_warmup_cosine_and_m_cos_over_the_planned_epochs(data, tmp_path, monkeypatch):
    monkeypatch.setenv(STEP_SECONDS_ENV, "0.1")  # 2.7 s less 5 % of 0.5 s epochs: 5 epochs, warmup 40/200: 1
    run = tmp_path / "v3"
    train(TrainConfig.from_recipe("cifar-v3", data=data, out=str(run), time_budget=2.7, moco_m_cos=True,
                                  warmup_epochs=40, **{**TINY, "moco_k": None}))
    cfg = TrainConfig.from_recipe("cifar-v3", batch_size=8)
    rows, steps = _rows(run / "steps.jsonl"), 5 * 5
    assert [r["step"] for r in rows] == list(range(steps))
    peak = scaled_lr(cfg.lr, 8)
    for row in (rows[2], rows[-1]):  # in the 1-epoch warmup, and the last step of the half-cosine
        epoch = row["step"] / 5
        assert row["lr"] == pytest.approx(v3_lr(epoch, 5, 1, peak))
        assert row["moco_m"] == pytest.approx(v3_momentum(epoch, 5, cfg.moco_m))
    assert rows[-1]["lr"] < 0.01 * peak and rows[-1]["moco_m"] > 0.9999


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, data: str, out: str, fixed: bool) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if fixed:  # each rank "measures" another step time: rank 0's plan must win on both
        os.environ[STEP_SECONDS_ENV] = str(0.2 * (rank + 1))
    torch.set_num_threads(1)
    cfg = TrainConfig.from_recipe("cifar", data=data, out=str(Path(out) / "run"), time_budget=3.2 if fixed else 8,
                                  **{**TINY, "batch_size": 8, "bn_splits": 1})
    t = Trainer(cfg)
    if fixed:
        t.close()
    else:
        t.fit()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"epochs": t.cfg.epochs, "plan": t.plan}))


@pytest.mark.parametrize("fixed", [True, False], ids=["ranks-timed-apart", "probed"])
def test_two_gloo_ranks_plan_the_same_epochs(data, tmp_path, fixed):
    mp.start_processes(_rank, args=(_free_port(), data, str(tmp_path), fixed), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    if fixed:  # 3.2 s less 5 % at rank 0's 0.2 s/step, 5 steps of 4 images per rank: 3 epochs (rank 1's 0.4 s/step: 1)
        assert ranks[0]["epochs"] == 3
    else:
        assert len(_rows(tmp_path / "run" / "metrics.jsonl")) == ranks[0]["epochs"] >= 1
