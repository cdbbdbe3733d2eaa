"""A resume continues the same experiment or refuses; the run folder has one owner; device rules."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mocohub.cli.main import main
from mocohub.data.synthetic import make_dataset
from mocohub.errors import MocohubError
from mocohub.training import TrainConfig, load_checkpoint
from mocohub.training.runtime import backend_for, choose_device
from mocohub.training.sampler import ResumableSampler
from mocohub.training.trainer import Trainer

TINY = ["--recipe", "cifar", "--image-size", "16", "--batch-size", "8", "--lr", "0.06", "--moco-k", "32", "--workers", "0",
        "--no-progress", "--log-every", "1", "--precision", "fp32", "--arch", "test_resnet"]  # timm's tiny ResNet


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    train_dir, _ = make_dataset(root / "a", train_per_class=4, val_per_class=0, size=16)
    other, _ = make_dataset(root / "b", train_per_class=5, val_per_class=0, size=16)
    return train_dir, other  # 40 and 50 images


@pytest.fixture(scope="module")
def trained(folders, tmp_path_factory):
    """A finished 1-epoch run to resume from (copied per test)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", str(folders[0]), *TINY, "--epochs", "1", "--out", str(run)]) == 0
    return run


def _copy(run: Path, dest: Path) -> Path:
    import shutil
    shutil.copytree(run, dest)
    return dest


@pytest.mark.parametrize("flags, difference", [
    (["--moco-k", "16"], "moco_k: 32 -> 16"),
    (["--batch-size", "4", "--moco-k", "32"], "batch_size: 8 -> 4"),  # crashed the queue pointer before
    (["--moco-m", "0.9"], "moco_m: 0.99 -> 0.9"),
    (["--wd", "0.1"], "weight_decay: 0.0005 -> 0.1"),  # was silently taken from the old optimizer state
    (["--seed", "5"], "seed: 0 -> 5"),
])
def test_resume_refuses_another_experiment(folders, trained, tmp_path, capsys, flags, difference):
    run = _copy(trained, tmp_path / "run")
    before = (run / "checkpoint.pth.tar").read_bytes()
    assert main(["train", str(folders[0]), *TINY, "--epochs", "2", "--out", str(run), *flags]) == 2
    err = capsys.readouterr().err
    assert difference in err and "--restart" in err and "another --out" in err
    assert (run / "checkpoint.pth.tar").read_bytes() == before


def test_resume_refuses_other_data(folders, trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    assert main(["train", str(folders[1]), *TINY, "--epochs", "2", "--out", str(run)]) == 2
    assert "data_images" in capsys.readouterr().err


def test_resume_refuses_as_many_images_under_other_names(folders, trained, tmp_path, capsys):
    """The fingerprint covers the file names, not only their count (40 images here and there)."""
    import shutil
    renamed = shutil.copytree(folders[0], tmp_path / "renamed")
    for path in sorted(renamed.rglob("*.png"))[:3]:
        path.rename(path.with_name("x" + path.name))
    moved = shutil.copytree(folders[0], tmp_path / "moved")  # the same names elsewhere: the same data
    run = _copy(trained, tmp_path / "run")
    assert main(["train", str(renamed), *TINY, "--epochs", "2", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "data_images" in err and "'images': 40" in err
    assert main(["train", str(moved), *TINY, "--epochs", "2", "--max-steps", "6", "--out", str(run)]) == 0


def test_resume_applies_and_reports_allowed_changes(folders, trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    moved = _copy(folders[0], tmp_path / "moved")  # the same images elsewhere are the same data
    assert main(["train", str(moved), *TINY, "--epochs", "2", "--lr", "0.01", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "resuming with changed settings" in out and "epochs: 1 -> 2" in out and "lr: 0.06 -> 0.01" in out
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [s["epoch"] for s in steps] == [0] * 5 + [1] * 5
    assert steps[5]["lr"] == pytest.approx(0.01 * 0.5)  # the new lr at epoch 1 of a 2-epoch cosine


def test_resume_takes_momentum_and_wd_from_the_flags_and_survives_a_precision_change(folders, tmp_path):
    """An official checkpoint's optimizer state carries its own momentum and wd; fp32 -> fp16
    used to crash in GradScaler.load_state_dict({})."""
    base = dict(data=str(folders[0]), image_size=16, batch_size=8, moco_k=32, workers=0, progress=False,
                epochs=1, precision="fp32", out=str(tmp_path / "run"), arch="test_resnet")
    Trainer(TrainConfig.from_recipe("cifar", **base)).fit()
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pth.tar")
    for group in ckpt["optimizer"]["param_groups"]:
        group.update(momentum=0.5, weight_decay=0.25)
    del ckpt["mocohub"]  # as an official file
    official = tmp_path / "official.pth.tar"
    torch.save(ckpt, official)
    t = Trainer(TrainConfig.from_recipe("cifar", **{**base, "out": str(tmp_path / "r2"), "resume": str(official)}))
    try:
        assert {(g["momentum"], g["weight_decay"]) for g in t.optimizer.param_groups} == {(0.9, 5e-4)}
    finally:
        t.close()
    t = Trainer(TrainConfig.from_recipe("cifar", **{**base, "epochs": 2, "precision": "fp16"}))
    try:
        assert t.state.epoch == 1 and t.scaler.is_enabled()
    finally:
        t.close()


def test_default_out_is_a_fresh_folder_per_run(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["train", str(folders[0]), *TINY, "--max-steps", "1"]) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("cifar-test_resnet-") for r in runs)
    assert all(load_checkpoint(r / "checkpoint.pth.tar")["mocohub"]["step_in_epoch"] == 1 for r in runs)


def test_restart_sets_the_old_files_aside(folders, trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    before = (run / "checkpoint.pth.tar").read_bytes()
    assert main(["train", str(folders[0]), *TINY, "--moco-k", "16", "--max-steps", "2", "--out", str(run),
                 "--restart"]) == 0
    aside = [p for p in run.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and (aside[0] / "checkpoint.pth.tar").read_bytes() == before
    assert (aside[0] / "backbone" / "model.safetensors").is_file()
    assert len((run / "steps.jsonl").read_text().splitlines()) == 2
    assert load_checkpoint(run / "checkpoint.pth.tar")["state_dict"]["module.queue"].shape == (128, 16)


def test_corrupt_checkpoint_names_the_file_and_the_way_out(folders, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pth.tar").write_bytes(b"PK\x03\x04 torn by a crash")
    assert main(["train", str(folders[0]), *TINY, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(run / "checkpoint.pth.tar") in err and "--restart" in err and "Traceback" not in err
    assert main(["train", str(folders[0]), *TINY, "--max-steps", "1", "--out", str(run), "--restart"]) == 0
    assert [p.name for p in run.glob("previous-*/*")] == ["checkpoint.pth.tar"]


def test_a_second_trainer_on_the_same_folder_is_refused_until_the_first_dies(folders, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    # mocohub's own RunLock, loaded without the package's __init__ (torch, timm: 3 s of start-up)
    package = Path(__file__).resolve().parents[1] / "mocohub"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, types; from pathlib import Path\n"
        f"for name, path in (('mocohub', {str(package)!r}), ('mocohub.training', {str(package / 'training')!r})):\n"
        "    sys.modules[name] = types.ModuleType(name); sys.modules[name].__path__ = [path]\n"
        "from mocohub.training.run_dir import RunLock\n"
        f"lock = RunLock(Path({str(run)!r})); print('locked', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", str(folders[0]), *TINY, "--max-steps", "1", "--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"in use by another mocohub train (PID {holder.pid})" in err
        assert not (run / "checkpoint.pth.tar").exists()
    finally:
        holder.kill()  # a crash: the kernel releases the lock
        holder.wait()
    assert main(["train", str(folders[0]), *TINY, "--max-steps", "1", "--out", str(run)]) == 0


@pytest.mark.parametrize("requested, local_rank, local_world, gpus, expected", [
    (None, 0, 1, 0, "cpu"),
    (None, 1, 2, 2, "cuda:1"),
    ("cpu", 1, 2, 2, "cpu"),          # --device cpu on a GPU machine stays on the CPU (and gloo)
    ("cuda", 1, 2, 2, "cuda:1"),      # no index: this process's GPU (raised in set_device before)
    ("cuda:1", 0, 1, 2, "cuda:1"),
])
def test_device_rules(requested, local_rank, local_world, gpus, expected):
    device = choose_device(requested, local_rank=local_rank, local_world=local_world, cuda_count=gpus)
    assert device == torch.device(expected)
    assert backend_for(device) == ("nccl" if device.type == "cuda" else "gloo")


@pytest.mark.parametrize("requested, local_world, gpus, message", [
    ("cuda:0", 2, 2, "would put all 2 processes of this node on one GPU"),
    ("cuda", 1, 0, "no CUDA GPU is visible"),
    ("cuda:3", 1, 2, "cuda:3 is not visible"),
    ("tpu:0", 1, 0, "is not a device"),
])
def test_device_rules_refuse(requested, local_world, gpus, message):
    with pytest.raises(MocohubError, match=message):
        choose_device(requested, local_rank=0, local_world=local_world, cuda_count=gpus)


def test_sampler_steps_are_the_same_images_under_any_process_count():
    one = list(ResumableSampler(50, 8, seed=3))
    assert len(one) == 48 and len(set(one)) == 48
    two = [list(ResumableSampler(50, 8, num_replicas=2, rank=r, seed=3)) for r in range(2)]
    for step in range(6):
        assert sorted(two[0][step * 4:(step + 1) * 4] + two[1][step * 4:(step + 1) * 4]) == \
            sorted(one[step * 8:(step + 1) * 8])
    resumed = ResumableSampler(50, 8, num_replicas=2, rank=1, seed=3)
    resumed.set_epoch(0, start_step=4)
    assert list(resumed) == two[1][16:] and len(resumed) == 8
