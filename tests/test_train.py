"""The trainer and `mocohub train`, end to end on tiny generated folders."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import mocohub
from mocohub.cli.main import main
from mocohub.data.folder import ImageFolder, collate_images
from mocohub.data.synthetic import make_dataset
from mocohub.training import TrainConfig, Trainer, load_checkpoint, train
from mocohub.training import checkpoint as checkpoint_module
from mocohub.zoo.card import METRIC_NAMES, model_card

TINY = ["--recipe", "cifar", "--image-size", "16", "--batch-size", "8", "--lr", "0.06", "--moco-k", "32", "--workers", "0",
        "--no-progress", "--log-every", "1"]
# timm's tiny ResNet (0.4 M parameters), for the runs whose point is not the default backbone:
# test_cli_end_to_end trains resnet18
SMALL = [*TINY, "--arch", "test_resnet"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    train_dir, val_dir = make_dataset(tmp_path_factory.mktemp("data"), train_per_class=4, val_per_class=2, size=16)
    return train_dir, val_dir  # 40 training images: 5 steps of 8


def _steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


def test_cli_end_to_end(folders, tmp_path, capsys):
    train_dir, val_dir = folders
    run = tmp_path / "run"
    assert main(["train", str(train_dir), *TINY, "--epochs", "2", "--out", str(run), "--val", str(val_dir),
                 "--precision", "fp32"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["skipped"] == 0 and r["images_per_s"] > 0 for r in rows)
    assert rows[0]["lr"] == pytest.approx(0.06) and rows[1]["lr"] == pytest.approx(0.03)  # per-epoch cosine
    steps = _steps(run)
    assert [s["step"] for s in steps] == list(range(10))
    for row in rows:  # an epoch's loss and instance accuracy are the means of its steps'
        mine = [s for s in steps if s["epoch"] == row["epoch"]]
        assert row["loss"] == pytest.approx(sum(s["loss"] for s in mine) / 5, rel=1e-6)
        assert row["acc1"] == pytest.approx(sum(s["acc1"] for s in mine) / 5, rel=1e-6)
    assert all((s["acc1"] * 8 / 100) == pytest.approx(round(s["acc1"] * 8 / 100)) for s in steps)  # k of 8 right

    ckpt = load_checkpoint(run / "checkpoint.pth.tar")
    assert ckpt["epoch"] == 2 and ckpt["arch"] == "resnet18"
    assert {k.split(".")[1] for k in ckpt["state_dict"]} == {"encoder_q", "encoder_k", "queue", "queue_ptr"}
    assert all(k.startswith("module.") for k in ckpt["state_dict"])
    assert ckpt["state_dict"]["module.queue"].shape == (128, 32)
    assert int(ckpt["state_dict"]["module.queue_ptr"]) == (10 * 8) % 32

    backbone = mocohub.from_pretrained(str(run / "backbone"))
    q = {k.removeprefix("module.encoder_q."): v for k, v in ckpt["state_dict"].items()
         if k.startswith("module.encoder_q.") and not k.startswith("module.encoder_q.fc.")}
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, q[key], msg=key)
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, 512)
    assert "backbone saved to" in capsys.readouterr().out

    # the kNN monitor scored the final query encoder (with its head, as the official demo does)
    moco = mocohub.MoCo("resnet18", dim=128, K=32, stem="cifar")
    moco.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()})
    loaders = [DataLoader(ImageFolder(d, mocohub.transform_for(backbone)), batch_size=256, collate_fn=collate_images)
               for d in (train_dir, val_dir)]
    knn = mocohub.knn_evaluate(moco.encoder_q, *loaders, k=200, t=0.1, precision="fp32")
    assert rows[1]["knn_top1"] == pytest.approx(knn["top1"]) and rows[1]["knn_top5"] == pytest.approx(knn["top5"])

    config = json.loads((run / "backbone" / "config.json").read_text())
    card = (run / "backbone" / "README.md").read_text()  # the model card, from the config it sits next to
    assert card == model_card(config) and "# MoCo v1 resnet18" in card and "| epochs | 2 |" in card
    assert f"| {METRIC_NAMES['knn_top1']} | {rows[1]['knn_top1']} |" in card and "he2020momentum" in card


def test_resume_reproduces_uninterrupted_losses(folders, tmp_path):
    train_dir, _ = folders
    whole, split = tmp_path / "whole", tmp_path / "split"
    base = dict(data=str(train_dir), image_size=16, batch_size=8, moco_k=32, workers=0, progress=False,
                log_every=1, epochs=2, seed=3, arch="test_resnet")
    train(TrainConfig.from_recipe("cifar", out=str(whole), **base))
    train(TrainConfig.from_recipe("cifar", out=str(split), max_steps=3, **base))  # stops mid-epoch 0
    assert load_checkpoint(split / "checkpoint.pth.tar")["mocohub"]["step_in_epoch"] == 3
    assert len(_steps(split)) == 3
    train(TrainConfig.from_recipe("cifar", out=str(split), **{**base, "workers": 2}))  # resumes by itself
    assert [s["loss"] for s in _steps(split)] == [s["loss"] for s in _steps(whole)]
    assert [s["lr"] for s in _steps(split)] == [s["lr"] for s in _steps(whole)]
    a, b = load_checkpoint(whole / "checkpoint.pth.tar"), load_checkpoint(split / "checkpoint.pth.tar")
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    # epoch 0's row averages all 5 steps, 3 of them run before the stop (not only the 2 after it)
    assert _epoch_rows(split) == _epoch_rows(whole) and len(_epoch_rows(whole)) == 2


def _epoch_rows(run: Path, keys=("epoch", "loss", "acc1", "lr", "skipped")) -> list[dict]:
    """metrics.jsonl without its timings."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: row[k] for k in keys} for row in rows]


def test_failed_checkpoint_write_keeps_previous(folders, tmp_path, monkeypatch):
    train_dir, _ = folders
    run = tmp_path / "run"
    cfg = dict(data=str(train_dir), image_size=16, batch_size=8, moco_k=32, workers=0, progress=False, out=str(run),
               arch="test_resnet")
    train(TrainConfig.from_recipe("cifar", epochs=1, **cfg))
    before = hashlib.sha256((run / "checkpoint.pth.tar").read_bytes()).hexdigest()

    def torn_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        train(TrainConfig.from_recipe("cifar", epochs=2, **cfg))
    assert hashlib.sha256((run / "checkpoint.pth.tar").read_bytes()).hexdigest() == before
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == []  # no torn temp file


def test_nan_loss_stops_and_keeps_last_good_checkpoint(folders, tmp_path, capsys):
    train_dir, _ = folders
    run = tmp_path / "run"
    assert main(["train", str(train_dir), *SMALL, "--epochs", "1", "--out", str(run)]) == 0
    before = (run / "checkpoint.pth.tar").read_bytes()
    code = main(["train", str(train_dir), *SMALL, "--epochs", "3", "--lr", "1e30", "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 3 and "loss became nan" in err and "last good state" in err
    assert (run / "checkpoint.pth.tar").read_bytes() == before
    assert json.loads((run / "backbone" / "config.json").read_text())["mocohub"]["epochs"] == 1


def test_corrupt_and_non_image_files_are_skipped_and_counted(tmp_path, capsys):
    train_dir, _ = make_dataset(tmp_path / "data", train_per_class=1, val_per_class=0, size=16)
    (train_dir / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (train_dir / "square" / "notes.txt").write_text("not an image")
    run = tmp_path / "run"
    assert main(["train", str(train_dir), *SMALL, "--batch-size", "4", "--moco-k", "8", "--epochs", "1",
                 "--out", str(run)]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]  # one line each
    assert sum("broken.jpg" in m for m in warned) == 1
    assert any("notes.txt" in m for m in warned)
    row = json.loads((run / "metrics.jsonl").read_text())
    assert row["skipped"] == 2  # the text file, and the corrupt JPEG (met once in the epoch)


def test_skipped_counts_files_not_decode_attempts(tmp_path, capsys):
    """4 undecodable files in a row: each one met tries the next ones as substitutes (4 + 3 + 2 + 1
    failed decodes in the epoch), and the row counts the 4 files."""
    train_dir, _ = make_dataset(tmp_path / "data", train_per_class=2, val_per_class=0, size=16)  # 20 images
    for path in sorted(train_dir.rglob("*.png"))[:4]:  # the folder's first 4 samples
        path.write_bytes(b"\xff\xd8 not a JPEG any more")
    run = tmp_path / "run"
    assert main(["train", str(train_dir), *SMALL, "--batch-size", "4", "--moco-k", "8", "--epochs", "1",
                 "--cache-images", "off", "--out", str(run)]) == 0
    assert json.loads((run / "metrics.jsonl").read_text())["skipped"] == 4
    assert capsys.readouterr().err.count("could not be decoded") == 4  # one warning per file


def test_nan_message_names_only_a_checkpoint_that_exists_and_fp32_only_to_other_precisions(folders, tmp_path,
                                                                                            capsys):
    from mocohub.training.stop import divergence_error
    run = tmp_path / "fresh"
    code = main(["train", str(folders[0]), *SMALL, "--epochs", "1", "--lr", "1e30", "--precision", "fp32",
                 "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 3 and "loss became nan" in err and "before its first checkpoint, so nothing was saved" in err
    assert "checkpoint.pth.tar" not in err and "--precision fp32" not in err and "Lower --lr" in err
    saved = tmp_path / "checkpoint.pth.tar"
    saved.write_bytes(b"a checkpoint")
    message = str(divergence_error("inf", 7, 1, saved, "bf16"))
    assert f"{saved} still holds the last good state" in message and "or train with --precision fp32" in message


@pytest.mark.parametrize("args, message", [
    (["--arch", "resnet7"], "unknown arch 'resnet7'; valid: resnet18"),
    (["--moco-k", "30"], "must be divisible by the global batch size 8"),
    (["--batch-size", "64", "--moco-k", "128"], "fewer than one batch of 64"),
    (["--bn-splits", "3"], "not divisible by 3 BN splits"),
])
def test_bad_flags_exit_2_with_a_message(folders, tmp_path, capsys, args, message):
    train_dir, _ = folders
    code = main(["train", str(train_dir), *TINY, "--out", str(tmp_path / "run"), *args])
    assert code == 2 and message in capsys.readouterr().err


def test_unknown_recipe_lists_the_valid_ones(folders, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", str(folders[0]), "--recipe", "moco-v9"])
    assert e.value.code == 2 and "moco-v1" in capsys.readouterr().err


def test_empty_folder_unwritable_run_dir_and_bad_resume(folders, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", str(empty), *TINY, "--out", str(tmp_path / "r1")]) == 2
    assert "no images found" in capsys.readouterr().err

    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    assert main(["train", str(folders[0]), *TINY, "--out", str(blocker / "run")]) == 2
    assert "cannot write to run directory" in capsys.readouterr().err and blocker.read_text() == "keep me"

    bogus = tmp_path / "bogus.pth.tar"
    torch.save({"weights": torch.zeros(2)}, bogus)
    assert main(["train", str(folders[0]), *TINY, "--out", str(tmp_path / "r2"), "--resume", str(bogus)]) == 2
    assert "is not a MoCo v1/v2 training checkpoint" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"\x00" * 100)
    assert main(["train", str(folders[0]), *TINY, "--out", str(tmp_path / "r3"), "--resume", str(garbage)]) == 2
    assert "is not a readable torch checkpoint" in capsys.readouterr().err


def test_official_checkpoint_resumes(folders, tmp_path):
    """A file in the official layout (no mocohub extras) is loaded whole and continues at its epoch."""
    train_dir, _ = folders
    torch.manual_seed(1)  # not the run's seed: nothing loaded can match a fresh model by chance
    model = mocohub.MoCo("test_resnet", dim=128, K=32, m=0.99, T=0.1, stem="cifar")
    opt = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    torch.nn.functional.cross_entropy(*model(torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16))).backward()
    opt.step()  # momentum buffers, a moved key encoder, 8 keys in the queue
    official = tmp_path / "official.pth.tar"
    torch.save({"epoch": 1, "arch": "test_resnet", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict()}, official)
    run = tmp_path / "run"
    trainer = Trainer(TrainConfig.from_recipe("cifar", data=str(train_dir), out=str(tmp_path / "inspect"),
                                              image_size=16, batch_size=8, arch="test_resnet",
                                              moco_k=32, workers=0, progress=False, resume=str(official)))
    loaded = trainer.model.state_dict()
    assert int(loaded["queue_ptr"]) == 8 and set(loaded) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key
    state = trainer.optimizer.state_dict()["state"]
    assert len(state) == len(opt.state_dict()["state"]) > 0
    for i, saved in opt.state_dict()["state"].items():
        assert torch.equal(state[i]["momentum_buffer"], saved["momentum_buffer"]), i
    trainer.rt.close()

    assert main(["train", str(train_dir), *SMALL, "--epochs", "2", "--out", str(run), "--resume", str(official)]) == 0
    assert [s["epoch"] for s in _steps(run)] == [1] * 5
    assert _steps(run)[0]["lr"] == pytest.approx(0.03)


def test_demo_reports_the_knn_of_its_random_init_and_of_its_export(tmp_path, capsys):
    """The demo's two figures are what its baseline and its exported backbone really score (that MoCo
    lifts the second well above the first: tests/test_learning.py, and the full demo in benchmarks/README)."""
    import re

    from test_learning import knn_top1, random_init_knn_top1

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "2", "--images-per-class", "13", "--workers", "0",
                 "--precision", "fp32"]) == 0
    text = capsys.readouterr().out
    random_init = float(re.search(r"random init\s+([\d.]+)%", text).group(1))
    trained = float(re.search(r"MoCo,\s+2 epochs\s+([\d.]+)%", text).group(1))
    train_dir, val_dir = out / "data" / "train", out / "data" / "val"
    assert random_init == pytest.approx(random_init_knn_top1(train_dir, val_dir), abs=0.05)
    assert trained == pytest.approx(knn_top1(mocohub.from_pretrained(str(out / "run" / "backbone")), train_dir, val_dir),
                                    abs=0.05)
    assert "embeddings of shape (4, 96)" in text


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])  # a scheduler's stop, and Ctrl-C in a terminal
def test_signal_finishes_the_step_checkpoints_and_resumes(folders, tmp_path, signum):
    import os
    import signal
    import subprocess
    import sys
    import time

    train_dir, _ = folders
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mocohub", "train", str(train_dir), *SMALL, "--workers", "2", "--epochs", "2",
           "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "steps.jsonl").exists() and len(_steps(run)) >= 2):
        time.sleep(0.05)
    os.killpg(proc.pid, getattr(signal, signum))  # to the process group, as a terminal does: loader workers too
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    state = load_checkpoint(run / "checkpoint.pth.tar")["mocohub"]
    done = len(_steps(run))
    assert 2 <= done < 10 and state["step_in_epoch"] == done % 5
    assert main(["train", str(train_dir), *SMALL, "--epochs", "2", "--out", str(run)]) == 0
    assert [s["step"] for s in _steps(run)] == list(range(10))


def test_val_folder_is_checked_before_training(folders, tmp_path, capsys):
    train_dir, _ = folders
    other = tmp_path / "val" / "zebra"
    other.mkdir(parents=True)
    shutil.copy(next((train_dir / "circle").iterdir()), other / "z.png")
    run = tmp_path / "run"
    assert main(["train", str(train_dir), *TINY, "--out", str(run), "--val", str(tmp_path / "val")]) == 2
    assert "the kNN monitor needs the same class sub-folders" in capsys.readouterr().err
    assert not (run / "checkpoint.pth.tar").exists()
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, image in enumerate(sorted((train_dir / "circle").iterdir())):
        shutil.copy(image, flat / f"{i}.png")
    assert main(["train", str(flat), *TINY, "--batch-size", "4", "--moco-k", "8", "--allow-large-queue", "--out", str(run),
                 "--val", str(tmp_path / "val")]) == 2
    assert "--val needs labelled training images" in capsys.readouterr().err


def test_step_log_averages_each_interval(folders, tmp_path):
    train_dir, _ = folders
    base = dict(data=str(train_dir), image_size=16, batch_size=8, moco_k=32, workers=0, progress=False, epochs=1,
                arch="test_resnet")
    train(TrainConfig.from_recipe("cifar", out=str(tmp_path / "each"), log_every=1, **base))
    train(TrainConfig.from_recipe("cifar", out=str(tmp_path / "pairs"), log_every=2, **base))
    each, pairs = _steps(tmp_path / "each"), _steps(tmp_path / "pairs")
    assert [(r["step"], r["steps"]) for r in pairs] == [(1, 2), (3, 2), (4, 1)]  # the epoch end flushes
    assert pairs[0]["loss"] == pytest.approx((each[0]["loss"] + each[1]["loss"]) / 2, rel=1e-6)
    assert pairs[2]["loss"] == pytest.approx(each[4]["loss"], rel=1e-6)
