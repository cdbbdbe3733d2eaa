"""RunLog: the run's JSON-lines logs (resumable, torn-line safe), TensorBoard mirror and curves."""
import json
import sys

import pytest

from mocohub.errors import MocohubError
from mocohub.jsonlog import read_jsonl
from mocohub.training.runlog import TENSORBOARD_DIR, RunLog


def _step(step, loss=1.0):
    return {"step": step, "epoch": step // 4, "steps": 1, "loss": loss, "acc1": 50.0, "lr": 0.03}


def test_rows_are_appended_and_trim_drops_what_a_resume_writes_again(tmp_path):
    with RunLog(tmp_path, curves=False) as log:
        log.log_steps([_step(s) for s in range(8)])
        log.log_epoch({"epoch": 0, "loss": 1.0})
        log.log_epoch({"epoch": 1, "loss": 0.5, "knn_top1": 40.0})
    assert [r["step"] for r in read_jsonl(tmp_path / "steps.jsonl")] == list(range(8))
    RunLog(tmp_path, curves=False).trim(step=4, epoch=1)
    assert [r["step"] for r in read_jsonl(tmp_path / "steps.jsonl")] == [0, 1, 2, 3]
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0]


def test_a_line_torn_by_a_kill_is_dropped_not_fatal(tmp_path):
    log = RunLog(tmp_path, curves=False)
    log.log_steps([_step(0), _step(1)])
    with open(tmp_path / "steps.jsonl", "a") as f:
        f.write('{"step": 2, "epoch": 0, "lo')  # killed mid-write
    log.log_steps(_step(2, loss=0.7))  # appended after the torn line, on a line of its own
    assert [r["step"] for r in read_jsonl(tmp_path / "steps.jsonl")] == [0, 1, 2]
    log.trim(step=2, epoch=0)
    lines = (tmp_path / "steps.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1]


def test_epoch_rows_refresh_the_curves(tmp_path):
    pytest.importorskip("matplotlib")
    log = RunLog(tmp_path)
    log.log_steps([_step(s) for s in range(4)])
    assert not (tmp_path / "curves.png").exists()
    log.log_epoch({"epoch": 0, "loss": 1.0, "acc1": 50.0, "lr": 0.03})
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    acc.Reload()
    return [(e.step, round(e.value, 4)) for e in acc.Scalars(tag)]


def test_tensorboard_mirrors_the_rows_and_a_resume_replaces_the_trimmed_ones(tmp_path):
    pytest.importorskip("tensorboard")
    with RunLog(tmp_path, tensorboard=True, curves=False) as log:
        log.log_steps([_step(s, loss=1.0) for s in range(6)])
        log.log_epoch({"epoch": 0, "loss": 1.0, "knn_top1": 30.0})
    with RunLog(tmp_path, tensorboard=True, curves=False) as log:  # resumed at step 4, epoch 1
        log.trim(step=4, epoch=1)
        log.log_steps([_step(s, loss=0.5) for s in range(4, 8)])
        log.log_epoch({"epoch": 1, "loss": 0.5, "knn_top1": 45.0})
    assert _scalars(tmp_path, "steps/loss") == [(s, 1.0) for s in range(4)] + [(s, 0.5) for s in range(4, 8)]
    assert _scalars(tmp_path, "epoch/knn_top1") == [(8, 45.0)]  # the epoch-0 row was logged at step 6 >= 4
    assert _scalars(tmp_path, "steps/lr")[0] == (0, 0.03)


def test_without_tensorboard_the_error_says_what_to_install(tmp_path, monkeypatch):
    packages = ("tensorboard", "torch.utils.tensorboard")
    for name in [*packages, *(m for m in list(sys.modules) if m.startswith(tuple(f"{p}." for p in packages)))]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed, imported here before or not
    with pytest.raises(MocohubError) as e:
        RunLog(tmp_path, tensorboard=True)
    assert f"{e.value.exit_code} {e.value}".startswith(
        "1 --tensorboard needs the tensorboard package: pip install 'mocohub[tensorboard]'")
