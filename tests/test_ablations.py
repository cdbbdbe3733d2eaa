"""benchmarks/ablations.py: a real (tiny) study end to end, its resume, and its data preparation."""
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mocohub.data.synthetic import make_dataset

pytest.importorskip("matplotlib")  # the study's plot (the plot extra, pulled by the test extra)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ablations.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _module():
    spec = importlib.util.spec_from_file_location("ablations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_queue_study_runs_reports_and_skips_finished_runs_on_rerun(tmp_path, capsys):
    make_dataset(tmp_path / "src", train_per_class=4, val_per_class=2, size=8)  # train/ + val/, 10 classes
    out = tmp_path / "out"
    argv = ["queue", "--size", "smoke", "--data", str(tmp_path / "src"), "--out", str(out), "--settings", "k16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    study = out / "queue"
    rows = [json.loads(line) for line in (study / "results.jsonl").read_text().splitlines()]
    settings = ["k16"]  # one of the smoke size's queue sizes (k8, k16), two seeds: a spread to shade
    assert sorted((r["setting"], r["seed"]) for r in rows) == sorted((s, seed) for s in settings for seed in (0, 1))
    for r in rows:
        assert r["status"] == "done" and r["epochs_done"] == r["epochs"] == 2
        assert math.isfinite(r["final_knn_top1"]) and all(math.isfinite(v) for v in r["curves"]["knn_top1"])
        assert math.isfinite(r["final_acc1"]) and len(r["curves"]["acc1"]) == 2
        assert r["flags"]["--moco-k"] == r["setting"][1:] and r["flags"]["--seed"] == str(r["seed"])
        assert r["precision"] in ("fp32", "bf16") and r["cpu_capability"]
    table = (study / "queue.md").read_text()
    for s in settings:
        assert f"| {s} | `--moco-k {s[1:]}` |" in table
    png = (study / "queue.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    from PIL import Image
    with Image.open(study / "queue.png") as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 300

    # the same command again: every run is skipped, nothing is trained or rewritten
    logs = {p: p.read_bytes() for p in study.glob("runs/*/ablation.log")}
    metrics = {p: p.stat().st_mtime_ns for p in study.glob("runs/*/metrics.jsonl")}
    assert len(logs) == len(metrics) == 2
    assert _module().main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count(": skipped (done") == 2 and "training (" not in printed
    assert {p: p.read_bytes() for p in study.glob("runs/*/ablation.log")} == logs
    assert {p: p.stat().st_mtime_ns for p in study.glob("runs/*/metrics.jsonl")} == metrics
    assert len((study / "results.jsonl").read_text().splitlines()) == 2


def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path, capsys):
    make_dataset(tmp_path / "src", train_per_class=2, val_per_class=1, size=8)
    assert _module().main(["all", "--size", "smoke", "--data", str(tmp_path / "src"),
                           "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(" -m mocohub train ") == 2 * (4 + 2 + 2 + 4 + 2)  # seeds x the five studies' settings
    assert "--moco-m 0 --seed 0" in printed and "--shuffle-bn false --bn-groups 8" in printed
    assert "--mlp true --moco-t 0.2 --aug moco-v2" in printed and "--symmetric true" in printed
    assert not (tmp_path / "out").exists()


def test_a_budgeted_run_takes_chosen_settings_and_epochs(tmp_path, capsys):
    """gpu_check.sh --ablation: m 0 against 0.99 only, for the epochs its time budget allows."""
    make_dataset(tmp_path / "src", train_per_class=2, val_per_class=1, size=8)
    common = ["momentum", "--size", "smoke", "--data", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--dry-run"]
    assert _module().main([*common, "--settings", "m0,m0.99", "--epochs", "3"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if " -m mocohub train " in line]
    assert len(commands) == 4 and all("--epochs 3 " in c for c in commands)
    assert sorted(c.split("--moco-m ")[1].split()[0] for c in commands) == ["0", "0", "0.99", "0.99"]
    with pytest.raises(SystemExit, match="no setting m0.5; its settings: m0, m0.9, m0.99, m0.999"):
        _module().main([*common, "--settings", "m0,m0.5"])


def test_a_larger_folder_is_cut_to_the_first_names_per_class_and_test_is_the_val_split(tmp_path):
    module = _module()
    make_dataset(tmp_path / "src", train_per_class=10, val_per_class=3, size=8)
    (tmp_path / "src" / "val").rename(tmp_path / "src" / "test")
    size = dict(module.SIZES["smoke"])  # 8 training and 2 val images per class
    train, val, n = module.prepare_data(tmp_path / "src", tmp_path / "out", size, dry_run=False)
    assert (train, val, n) == (tmp_path / "out" / "data" / "train", tmp_path / "out" / "data" / "val", 80)
    assert sorted(p.name for p in (train / "circle").iterdir()) == [f"circle_{i:05d}.png" for i in range(8)]
    assert sorted(p.name for p in (val / "circle").iterdir()) == ["circle_00000.png", "circle_00001.png"]
    assert module.prepare_data(tmp_path / "src", tmp_path / "out", size, dry_run=False)[2] == 80  # made once
    with pytest.raises(SystemExit, match="another subset"):
        module.prepare_data(tmp_path / "src", tmp_path / "out", {**size, "train_per_class": 9}, dry_run=False)


def test_the_archive_is_streamed_into_a_per_class_subset(tmp_path):
    module = _module()
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
    size = {**module.SIZES["smoke"], "train_per_class": 2, "val_per_class": 1}
    train, val, n = module.prepare_data(archive, tmp_path / "out", size, dry_run=False)
    assert n == 4 and sorted(p.name for p in (train / "dog").iterdir()) == ["0000.jpg", "0001.jpg"]
    assert (train / "dog" / "0001.jpg").read_bytes() == b"train/dog/1"
    assert [p.name for p in (val / "cat").iterdir()] == ["0000.jpg"]
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path / "out" / "data" / ".partial").exists()
    full = {**size, "train_per_class": None, "val_per_class": None}
    train, val, n = module.prepare_data(archive, tmp_path / "full", full, dry_run=False)
    assert n == 10 and len(list((val / "dog").iterdir())) == 3
