"""benchmarks/ablations.py: a real (tiny) study through `mocohub train`, its resume and skip, the
report rebuilt from the committed results, and the data preparation."""
import importlib
import io
import json
import math
import tarfile
from pathlib import Path

import pytest

from mocohub.data.synthetic import make_dataset
from mocohub.jsonlog import read_jsonl
from mocohub.run_folder import RunFolder
from mocohub.training.record import read_record

pytest.importorskip("matplotlib")  # the study's plot (the plot extra, pulled by the test extra)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def ablations(monkeypatch):
    """The script's modules, imported as the script imports them (from benchmarks/)."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("ablations")


def _rows(study: Path) -> list[dict]:
    return read_jsonl(study / "results.jsonl")


def _png(path: Path) -> None:
    assert path.read_bytes().startswith(PNG_MAGIC)
    from PIL import Image
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 300


def test_a_study_runs_resumes_unfinished_runs_skips_recorded_ones_and_refuses_changed_settings(
        tmp_path, capsys, monkeypatch, ablations):
    """Each run is a real `python -m mocohub train` process (4 in all: the test's time)."""
    make_dataset(tmp_path / "src", train_per_class=4, val_per_class=2, size=8)  # train/ + val/, 10 classes
    out = tmp_path / "out"
    argv = ["queue", "--size", "smoke", "--data", str(tmp_path / "src"), "--out", str(out), "--settings", "k16"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the trainer processes' threads
    assert ablations.main([*argv, "--epochs", "1"]) == 0  # 1 epoch first, as a time budget allows
    study = out / "queue"
    assert [(r["setting"], r["seed"], r["epochs_done"], r["resumed"]) for r in _rows(study)] == \
        [("k16", 0, 1, False), ("k16", 1, 1, False)]

    # the size's 2 epochs: the epochs may change (the trainer's rule), so each run resumes from its
    # checkpoint and its row is replaced, not added
    assert ablations.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("resumed from") == 2
    rows = _rows(study)
    assert [(r["setting"], r["seed"]) for r in rows] == [("k16", 0), ("k16", 1)]
    for r in rows:
        run = RunFolder(r["run_dir"])
        record = read_record(run.record)
        assert r["status"] == "done" and r["resumed"] and r["epochs_done"] == r["epochs"] == 2
        assert r["curves"]["epoch"] == [0, 1] and [m["epoch"] for m in read_jsonl(run.metrics)] == [0, 1]
        assert math.isfinite(r["final_knn_top1"]) and all(math.isfinite(v) for v in r["curves"]["knn_top1"])
        assert r["final_acc1"] == read_jsonl(run.metrics)[-1]["acc1"]
        assert r["flags"]["--moco-k"] == "16" and r["flags"]["--seed"] == str(r["seed"])
        assert r["precision"] == record["precision"] in ("fp32", "bf16")  # from run.json, not the lines
        assert r["memory_format"] == record["memory_format"] and r["cpu_capability"]
        assert r["wall_seconds"] > r["train_seconds"] > 0
    table = (study / "queue.md").read_text()
    assert "| k16 | `--moco-k 16` |" in table and "| 2/2 |" in table
    _png(study / "queue.png")

    # the same command again: every run is skipped, nothing is trained or rewritten
    logs = {p: p.read_bytes() for p in study.glob("runs/*/ablation.log")}
    metrics = {p: p.stat().st_mtime_ns for p in study.glob("runs/*/metrics.jsonl")}
    assert len(logs) == len(metrics) == 2
    assert ablations.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count(": skipped (done") == 2 and "training (" not in printed
    assert {p: p.read_bytes() for p in study.glob("runs/*/ablation.log")} == logs
    assert {p: p.stat().st_mtime_ns for p in study.glob("runs/*/metrics.jsonl")} == metrics
    assert len(_rows(study)) == 2

    # a recorded run whose settings changed in a way the trainer refuses to resume: refused, exit 2
    lines = (study / "results.jsonl").read_text().replace('"--moco-k": "16"', '"--moco-k": "8"')
    (study / "results.jsonl").write_text(lines)
    assert ablations.main(argv) == 2
    assert "moco_k: 8 -> 16" in capsys.readouterr().err


def test_a_diverged_run_is_recorded_as_diverged_and_not_retried(tmp_path, capsys, monkeypatch, ablations):
    """A real `mocohub train` whose loss becomes nan (lr 1e30): its exit code, as the package's divergence
    error carries it, makes the row 'diverged'; the rerun skips it. One seed (run_study directly): one
    process, the test's time."""
    import argparse
    import dataclasses
    from ablation_data import prepare_data
    from ablation_studies import SIZES
    monkeypatch.setitem(SIZES, "smoke", dataclasses.replace(SIZES["smoke"], lr=1e30))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    make_dataset(tmp_path / "src", train_per_class=4, val_per_class=2, size=8)
    args = argparse.Namespace(size="smoke", out=tmp_path / "out", seeds=1, dry_run=False, settings=["m0.99"],
                              epochs=None)
    images = prepare_data(tmp_path / "src", args.out, (8, 2))
    ablations.run_study("momentum", args, images, {})
    [row] = _rows(args.out / "momentum")
    assert row["status"] == "diverged" and row["epochs_done"] == 0 and row["final_knn_top1"] is None
    assert row["error"].startswith("mocohub train: error: the loss became nan")
    assert "| m0.99 | `--moco-m 0.99` | n/a | n/a |" in (args.out / "momentum" / "momentum.md").read_text()
    capsys.readouterr()
    ablations.run_study("momentum", args, images, {})
    assert ": skipped (diverged: after 0 epochs" in capsys.readouterr().out and len(_rows(args.out / "momentum")) == 1


def test_the_report_is_rebuilt_from_the_committed_results_without_training(tmp_path, ablations):
    """benchmarks/ablations-cpu/<study>.jsonl (rows of the earlier code) give the committed tables."""
    from ablation_report import plot_study, write_report
    from ablation_studies import SIZES, STUDIES, plan
    size = SIZES["cpu"]
    base = size.base_flags()
    for name, study in STUDIES.items():
        rows = read_jsonl(BENCH / "ablations-cpu" / f"{name}.jsonl")
        settings, notes = plan(study, size, base)
        assert len(rows) == 2 * len(settings)
        md = write_report(tmp_path / f"{name}.md", rows, study=name, claim=study.claim, settings=settings,
                          notes=notes, size="cpu", base=base, n_train=5000, n_val=1000, seeds=2)
        assert md.read_text() == (BENCH / "ablations-cpu" / f"{name}.md").read_text()
    _png(plot_study(tmp_path / "momentum.png", read_jsonl(BENCH / "ablations-cpu" / "momentum.jsonl"),
                    study="momentum", settings=plan(STUDIES["momentum"], size, base)[0], size="cpu", seeds=2,
                    classes=10))


def test_a_setting_the_trainer_refuses_is_dropped_with_its_reason(ablations):
    from ablation_studies import SIZES, STUDIES, plan
    size = SIZES["smoke"]
    odd = {**size.sweeps, "--moco-k": (12, 16)}  # 12: no multiple of the batch 8
    settings, notes = plan(STUDIES["queue"], size.__class__(**{**vars(size), "sweeps": odd}), size.base_flags())
    assert [s.name for s in settings] == ["k16"]
    assert notes == ["k12 dropped: --moco-k 12 must be divisible by the global batch size 8 (the queue advances "
                     "by the keys of a whole step)"]
    settings, notes = plan(STUDIES["shuffle-bn"], size, size.base_flags())  # batch 8: one BN group
    assert len(settings) == 2 and notes[0].startswith("shuffle-bn: 1 BN group(s) of 8 images, not 8")


def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path, capsys, ablations):
    make_dataset(tmp_path / "src", train_per_class=2, val_per_class=1, size=8)
    assert ablations.main(["all", "--size", "smoke", "--data", str(tmp_path / "src"),
                           "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(" -m mocohub train ") == 2 * (4 + 2 + 2 + 4 + 2)  # seeds x the five studies' settings
    assert "--moco-m 0 --seed 0" in printed and "--shuffle-bn false --bn-groups 8" in printed
    assert "--mlp true --moco-t 0.2 --aug moco-v2" in printed and "--symmetric true" in printed
    assert not (tmp_path / "out").exists()


def test_a_budgeted_run_takes_chosen_settings_and_epochs(tmp_path, capsys, ablations):
    """gpu_check.sh --ablation: m 0 against 0.99 only, for the epochs its time budget allows."""
    make_dataset(tmp_path / "src", train_per_class=2, val_per_class=1, size=8)
    common = ["momentum", "--size", "smoke", "--data", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
              "--dry-run"]
    assert ablations.main([*common, "--settings", "m0,m0.99", "--epochs", "3"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if " -m mocohub train " in line]
    assert len(commands) == 4 and all("--epochs 3 " in c for c in commands)
    assert sorted(c.split("--moco-m ")[1].split()[0] for c in commands) == ["0", "0", "0.99", "0.99"]
    assert ablations.main([*common, "--settings", "m0,m0.5"]) == 2
    assert "no setting m0.5; its settings: m0, m0.9, m0.99, m0.999" in capsys.readouterr().err


def test_a_larger_folder_is_cut_to_the_first_names_per_class_and_test_is_the_val_split(tmp_path, ablations):
    from ablation_data import prepare_data
    from mocohub.errors import MocohubError
    make_dataset(tmp_path / "src", train_per_class=10, val_per_class=3, size=8)
    (tmp_path / "src" / "val").rename(tmp_path / "src" / "test")
    images = prepare_data(tmp_path / "src", tmp_path / "out", (8, 2))
    train, val = tmp_path / "out" / "data" / "train", tmp_path / "out" / "data" / "val"
    assert images == (train, val, 80, 20, 10)
    assert sorted(p.name for p in (train / "circle").iterdir()) == [f"circle_{i:05d}.png" for i in range(8)]
    assert sorted(p.name for p in (val / "circle").iterdir()) == ["circle_00000.png", "circle_00001.png"]
    assert prepare_data(tmp_path / "src", tmp_path / "out", (8, 2)).n_train == 80  # made once
    with pytest.raises(MocohubError, match="another subset"):
        prepare_data(tmp_path / "src", tmp_path / "out", (9, 2))


def test_the_archive_is_streamed_into_a_per_class_subset(tmp_path, ablations):
    from ablation_data import prepare_data
    archive = tmp_path / "cifar10-jpg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split, count in (("train", 5), ("test", 3)):
            for cls in ("cat", "dog"):
                for i in reversed(range(count)):  # stored out of order: the subset is by sorted name
                    data = f"{split}/{cls}/{i}".encode()
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("../escape.jpg")  # never written outside the destination
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    train, val, n, n_val, classes = prepare_data(archive, tmp_path / "out", (2, 1))
    assert (n, n_val, classes) == (4, 2, 2)
    assert sorted(p.name for p in (train / "dog").iterdir()) == ["0000.jpg", "0001.jpg"]
    assert (train / "dog" / "0001.jpg").read_bytes() == b"train/dog/1"
    assert [p.name for p in (val / "cat").iterdir()] == ["0000.jpg"]
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path / "out" / "data" / ".partial").exists()
    train, val, n, n_val, _ = prepare_data(archive, tmp_path / "full", (None, None))
    assert (n, n_val) == (10, 6) and len(list((val / "dog").iterdir())) == 3
