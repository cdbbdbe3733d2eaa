"""``--time-budget``: the duration flag, the planner (a table), the schedule stretched onto the plan,
a real budgeted run that ends near its budget with the lr at its final value, a probe that leaves no
trace in the run, the one re-plan from the run's own epochs (on a fake clock), a resumed run that keeps
its plan, and two gloo ranks that plan (and re-plan) the same epochs."""
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
from mocohub.training.budget import (DRIFT_MARGIN, EPOCH_SECONDS_ENV, STEP_SECONDS_ENV, fit_schedule, make_plan,
                                     parse_duration, plan_epochs, plan_line, planned_config, replan, replan_epoch,
                                     replan_line)
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
    # a re-plan after 3 epochs, 40 s spent: 40 + (epochs - 3) x 10 (+ the passes after the third)
    (100, dict(step_s=1, steps_per_epoch=10, fixed_s=40, start=3), 9),
    (100, dict(step_s=1, steps_per_epoch=10, fixed_s=40, start=3, knn_s=5, knn_every=2), 7),  # 40 + 40 + 3 x 5
    (100, dict(step_s=1, steps_per_epoch=10, fixed_s=120, start=3), 4),               # over already: one more
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
    assert fit_schedule(cfg, epochs) == cfg  # fitted again to its own epochs (as a re-plan does): unchanged


@pytest.mark.parametrize("epochs, knn_every, after", [
    (29, None, 7), (29, 1, 7), (29, 4, 9), (100, 4, 25), (8, 2, 3), (3, None, 2), (2, None, None), (5, 4, None),
    (9, 4, 5),
])
def test_the_replan_comes_a_quarter_in_after_the_first_epoch_and_whole_knn_cycles(epochs, knn_every, after):
    assert replan_epoch(epochs, knn_every) == after
    if after is not None:  # the timed epochs (after the first) hold whole kNN cycles
        assert (after - 1) % (knn_every or 1) == 0 and after < epochs


@pytest.mark.parametrize("recipe, first, after, epochs, lr_steps, warmup", [
    ("moco-v1", 10, 3, 20, (12, 16), 0),    # milestones 6, 8 ahead: stretched x2
    ("moco-v1", 10, 7, 12, (6, 10), 0),     # 6 passed: stays; 8 ahead: 10
    ("moco-v1", 10, 7, 8, (6, 8), 0),       # 8 x 0.8 = 6.4, but after the re-plan: 8
    ("moco-v3", 30, 8, 45, (), 3),          # the warmup passed: stays 3
    ("moco-v3-vit", 40, 3, 20, (), 4),      # warmup 5 of 40, ahead: 2.5 -> after + 1
    ("moco-v3-vit", 40, 2, 3, (), 2),       # ahead (after + 1 = 3), but below the run's length
])
def test_a_replan_keeps_what_passed_and_stretches_what_is_ahead(recipe, first, after, epochs, lr_steps, warmup):
    plan = {"budget_s": 60.0, "epochs": epochs, "replan": {"after_epoch": after, "from_epochs": first}}
    cfg = planned_config(TrainConfig.from_recipe(recipe), plan)
    assert (cfg.epochs, cfg.lr_steps, cfg.warmup_epochs, cfg.time_budget) == (epochs, lr_steps, warmup, 60.0)
    # the trainer re-plans from its fitted config: the same schedule
    fitted = planned_config(TrainConfig.from_recipe(recipe), {"budget_s": 60.0, "epochs": first})
    assert planned_config(fitted, plan) == cfg


def test_a_replan_fits_the_rest_of_the_budget_and_says_so():
    plan = dict(budget_s=3600, epochs=29, steps_per_epoch=195, step_s=0.53, epoch_s=0.4, knn_s=20.0, knn_every=4)
    # after 9 epochs, 900 s spent, 93 s per epoch since the first: (3420 - 900) / 93 = 27.1 more
    again = replan(plan, after_epoch=9, epoch_s=93.0, elapsed_s=900.0)
    assert again["epochs"] == 36 and again["replan"] == {"after_epoch": 9, "from_epochs": 29, "epoch_s": 93.0,
                                                         "elapsed_s": 900.0}
    assert {k: v for k, v in again.items() if k != "replan"} == {**plan, "epochs": 36}
    # probed: 195 x 0.53 + 0.4 + 20 / 4 = 108.75 s
    assert replan_line(again) == ("re-planned after epoch 9: 1 min 33 s per epoch (probed: 1 min 49 s), "
                                  "36 epochs in all, not 29")
    assert replan_line(replan(plan, after_epoch=9, epoch_s=108.0, elapsed_s=1200.0)).endswith(  # 9 + 20.6
        "the plan of 29 epochs holds")
    # slower than probed, over the budget already: one more epoch, the schedule still ends
    assert replan(plan, after_epoch=9, epoch_s=400.0, elapsed_s=3500.0)["epochs"] == 10


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
        # the same run told its first plan's epochs: the probe changed nothing (weights, queue, RNG,
        # optimiser) up to the re-plan
        first = plan["replan"]["from_epochs"] if "replan" in plan else epochs
        train(TrainConfig.from_recipe("cifar", data=data, out=str(tmp_path / "epochs"), epochs=first,
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
    same = plan["replan"]["after_epoch"] * plan["steps_per_epoch"] if "replan" in plan else steps
    assert [r["loss"] for r in rows[:same]] == [r["loss"] for r in _rows(tmp_path / "epochs" / "steps.jsonl")[:same]]


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
    assert "keeps its plan (budget 3.2 s: 3 epochs of 5 steps" in capsys.readouterr().out
    whole_rows, cut_rows = _rows(whole / "steps.jsonl"), _rows(cut / "steps.jsonl")
    assert len(whole_rows) == 15 and [r["loss"] for r in cut_rows] == [r["loss"] for r in whole_rows]
    assert [r["lr"] for r in cut_rows] == [r["lr"] for r in whole_rows]
    assert json.loads((cut / "run.json").read_text())["plan"]["epochs"] == 3


def test_a_run_faster_than_probed_replans_and_a_resumed_one_ends_where_it_does(data, tmp_path, monkeypatch,
                                                                             capsys):
    """The fake clock: 0.2 s steps, 5 per epoch: 7 epochs in 8 s less 5 %; after epoch 2 (a quarter in)
    the epochs took 0.5 s: 1 s spent, 13 more fit."""
    monkeypatch.setenv(STEP_SECONDS_ENV, "0.2")
    monkeypatch.setenv(EPOCH_SECONDS_ENV, "0.5")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(TrainConfig.from_recipe("cifar", data=data, out=str(whole), time_budget=8, **TINY))
    assert "re-planned after epoch 2: 0.5 s per epoch (probed: 1 s), 15 epochs in all, not 7" in capsys.readouterr().out
    plan = json.loads((whole / "run.json").read_text())["plan"]
    assert plan["epochs"] == 15 and plan["replan"]["after_epoch"] == 2
    rows = _rows(whole / "steps.jsonl")
    peak = rows[0]["lr"]  # the cosine starts at its peak
    assert len(rows) == 75 and len(_rows(whole / "metrics.jsonl")) == 15
    # the cosine over 7 epochs up to the re-plan, over 15 from there: the last epoch's lr near 0
    for row in rows:
        epoch = row["step"] // 5
        assert row["lr"] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * epoch / (7 if epoch < 2 else 15))))
    # cut after the re-plan: the checkpoint keeps the new plan, the resumed run ends where the whole one does
    train(TrainConfig.from_recipe("cifar", data=data, out=str(cut), time_budget=8, max_steps=13, **TINY))
    monkeypatch.setenv(EPOCH_SECONDS_ENV, "0.1")  # a resumed run never re-plans
    train(TrainConfig.from_recipe("cifar", data=data, out=str(cut), time_budget=8, **TINY))
    cut_rows = _rows(cut / "steps.jsonl")
    assert [(r["loss"], r["lr"]) for r in cut_rows] == [(r["loss"], r["lr"]) for r in rows]
    kept = json.loads((cut / "run.json").read_text())["plan"]
    assert {**kept, "probe_s": 0} == {**plan, "probe_s": 0}  # (the cut run had a probe of its own)


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
    if fixed:  # each rank "measures" another step and epoch time: rank 0's plans must win on both
        os.environ[STEP_SECONDS_ENV] = str(0.2 * (rank + 1))
        os.environ[EPOCH_SECONDS_ENV] = str(0.5 * (rank + 1))
    torch.set_num_threads(1)
    cfg = TrainConfig.from_recipe("cifar", data=data, out=str(Path(out) / "run"), time_budget=3.2 if fixed else 8,
                                  **{**TINY, "batch_size": 8, "bn_splits": 1})
    t = Trainer(cfg)
    t.fit()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"epochs": t.cfg.epochs, "plan": t.plan}))


@pytest.mark.parametrize("fixed", [True, False], ids=["ranks-timed-apart", "probed"])
def test_two_gloo_ranks_plan_the_same_epochs(data, tmp_path, fixed):
    mp.start_processes(_rank, args=(_free_port(), data, str(tmp_path), fixed), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert len(_rows(tmp_path / "run" / "metrics.jsonl")) == ranks[0]["epochs"] >= 1
    if fixed:  # 3.2 s less 5 % at rank 0's 0.2 s/step, 5 steps of 4 images per rank: 3 epochs (rank 1's 0.4 s/step:
        # 1); re-planned after 2 at rank 0's 0.5 s epochs: 6 (rank 1's 1 s: 3)
        assert ranks[0]["plan"]["replan"]["from_epochs"] == 3 and ranks[0]["epochs"] == 6
