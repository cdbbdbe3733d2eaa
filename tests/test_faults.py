"""Faults on real processes and real files: SIGKILL mid-run, a full disk (a real tmpfs), images
vanishing under a running trainer. Nothing here is mocked. The SIGKILL runs train resnet18 (its 135 MB
checkpoint write is a wide window to kill in); the others a tiny ResNet, and the full-disk runs go
through the CLI in this process (a subprocess would add only its start-up)."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mocohub
from mocohub.cli.main import main
from mocohub.errors import MocohubError
from mocohub.zoo.download import cache_file, download

from eval_fixtures import make_image_folder, tiny_resnet
from servers import FileServer
from zoo_layouts import moco_v1v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fault_sweep import CHECKPOINT, ENV, TINY, Fault, compare, killed_run, make_data, train_command  # noqa: E402

MiB = 1 << 20
SMALL = ["--arch", "test_resnet"]  # timm's tiny ResNet: what these faults hit does not depend on the model


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return make_data(tmp_path_factory.mktemp("data"))  # 20 training images: 2 steps per epoch


@pytest.fixture
def mocohub_cli(capsys):
    """`mocohub ARGS` run in this process: its exit code and output as a CompletedProcess."""
    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["mocohub", *args], code, out, err)
    return run


def _train(cli, data: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return cli("train", str(data), *TINY, *SMALL, "--out", str(out), *flags)


def _leftovers(root: Path) -> list[str]:
    """Temp files of an atomic write, or staging folders, that a failure left behind."""
    return [str(p) for p in root.rglob(".*") if p.name != ".lock"]


def _disk_full(proc: subprocess.CompletedProcess, name: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "no space left on the disk" in proc.stderr and name in proc.stderr and "Free space" in proc.stderr
    assert "Traceback" not in proc.stderr


class Tmpfs:
    """A real size-limited file system; ``resize`` stands for freeing space on it."""

    def __init__(self, path: Path, size: int):
        self.path = path
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")

    def resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def used(self) -> int:
        return shutil.disk_usage(self.path).used

    def fill(self) -> None:
        """Write a filler file until the disk refuses (every block taken)."""
        with open(self.path / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def tmpfs(tmp_path):
    mounted: list[Tmpfs] = []

    def mount(size: int) -> Tmpfs:
        mounted.append(Tmpfs(tmp_path / f"disk{len(mounted)}", size))
        return mounted[-1]

    yield mount
    for disk in mounted:
        disk.unmount()


# -- SIGKILL -------------------------------------------------------------------------------------
@pytest.fixture
def reference(data, tmp_path):
    """An uninterrupted 2-epoch run with the kNN monitor, started now and trained beside the test (one
    thread each, on a second core where there is one); calling it waits for the run and gives its folder."""
    run = tmp_path / "reference"
    proc = subprocess.Popen(train_command(*data, run, 2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=ENV)

    def finished() -> Path:
        err = proc.communicate(timeout=120)[1]
        assert proc.returncode == 0, err
        return run

    yield finished
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_sigkill_mid_checkpoint_mid_knn_and_at_random_resumes_to_the_same_weights_and_rows(data, reference, tmp_path):
    """Killed while writing the first checkpoint, while the kNN monitor runs with the epoch's metrics
    row pending, stopped by SIGTERM mid-epoch (a checkpoint at the step) and killed at a seeded moment:
    each checkpoint on disk loads, the weights end bit-equal and no step or metrics row is lost or
    changed (the mid-epoch resume's epoch row averages the whole epoch)."""
    run = tmp_path / "run"
    faults = [Fault("write"), Fault("knn"), Fault("term"), Fault("time", random.Random(0).uniform(1.0, 4.0))]
    out = killed_run(train_command(*data, run, 2), run, faults, tmp_path / "seen", timeout=120)
    assert out.kills[:3] == ["checkpoint write", "kNN / metrics row pending (hit)", "SIGTERM mid-epoch"], out.kills
    assert out.final_rc == 0 and out.unreadable == [] and out.checkpoints_seen >= 2
    assert compare(run, reference()) == (True, [])


def test_an_epochs_metrics_row_is_written_before_its_checkpoint(data, tmp_path, monkeypatch, mocohub_cli):
    """What a kill during the kNN monitor relies on: it finds the previous checkpoint, so the resume
    trains the epoch and writes its row again. (The harness above kills as soon as the row is pending,
    before a checkpoint saved ahead of the monitor would have landed: it cannot tell the orders apart.)"""
    import mocohub.training.state as trainer_module
    run, seen, real = tmp_path / "run", [], trainer_module.save_checkpoint

    def save(state, path):
        rows = run / "metrics.jsonl"
        seen.append((state["epoch"], len(rows.read_text().splitlines()) if rows.exists() else 0))
        return real(state, path)

    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    assert _train(mocohub_cli, data[0], run, "--epochs", "2", "--val", str(data[1])).returncode == 0
    assert seen == [(1, 1), (2, 2)]  # (the checkpoint's epoch, rows on disk as it is written)


# -- a full disk ---------------------------------------------------------------------------------
def test_full_disk_at_a_checkpoint_write_keeps_the_previous_one_and_the_same_command_continues(
        data, tmpfs, mocohub_cli):
    disk = tmpfs(400 * MiB)
    run = disk.path / "run"
    assert _train(mocohub_cli, data[0], run, "--epochs", "1").returncode == 0
    before = (run / CHECKPOINT).read_bytes()
    disk.resize(disk.used() + len(before) // 2)  # the next checkpoint cannot sit beside this one
    _disk_full(_train(mocohub_cli, data[0], run, "--epochs", "2"), CHECKPOINT)
    assert (run / CHECKPOINT).read_bytes() == before and _leftovers(disk.path) == []
    disk.resize(400 * MiB)
    assert _train(mocohub_cli, data[0], run, "--epochs", "2").returncode == 0
    assert mocohub.training.load_checkpoint(run / CHECKPOINT)["epoch"] == 2


def test_full_disk_at_a_log_append_cuts_the_log_back_and_the_same_command_continues(data, tmpfs, mocohub_cli):
    disk = tmpfs(MiB)
    run = disk.path / "run"
    run.mkdir()
    (run / ".lock").write_text("0")  # its block exists, so the run lock needs no new one
    disk.fill()
    _disk_full(_train(mocohub_cli, data[0], run, "--max-steps", "2"), "run.json")  # the first file a run writes
    assert _leftovers(disk.path) == [] and not (run / "run.json").exists()
    disk.resize(disk.used() + 4096)  # room for run.json, none for a log row
    proc = _train(mocohub_cli, data[0], run, "--max-steps", "2")
    _disk_full(proc, "steps.jsonl")
    assert "keeps its earlier rows" in proc.stderr
    assert (run / "steps.jsonl").read_bytes() == b"" and _leftovers(disk.path) == []
    disk.resize(400 * MiB)
    assert _train(mocohub_cli, data[0], run, "--max-steps", "2").returncode == 0
    assert [json.loads(line)["step"] for line in (run / "steps.jsonl").read_text().splitlines()] == [0, 1]


def test_full_disk_during_extract_keeps_the_finished_shards_and_resume_continues(tmp_path, tmpfs, mocohub_cli):
    images = make_image_folder(tmp_path / "images", per_class=8)  # 24 images, 6 shards of 4
    model = tmp_path / "model"
    mocohub.save_pretrained(tiny_resnet(), model)
    expected = tmp_path / "expected.safetensors"
    flags = ["--device", "cpu", "--shard-size", "4", "--quiet"]
    assert mocohub_cli("extract", str(model), str(images), str(expected), *flags).returncode == 0
    disk = tmpfs(MiB)
    out = disk.path / "emb.safetensors"
    disk.fill()
    (disk.path / "filler").unlink()
    disk.resize(16 * 4096)  # a few blocks: the state file and about two shards
    proc = mocohub_cli("extract", str(model), str(images), str(out), *flags)
    _disk_full(proc, "shard-")
    assert "--resume" in proc.stderr
    kept = sorted(disk.path.glob("emb.safetensors.partial/shard-*"))
    assert 0 < len(kept) < 6 and all(load_file(p)["features"].shape == (4, 512) for p in kept)
    assert _leftovers(disk.path) == [] and not out.exists()
    disk.resize(4 * MiB)
    assert mocohub_cli("extract", str(model), str(images), str(out), *flags, "--resume").returncode == 0
    assert torch.equal(load_file(out)["embeddings"], load_file(expected)["embeddings"])


def test_full_disk_during_a_download_keeps_the_cache_and_the_retry_succeeds(tmp_path, tmpfs, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    torch.save(moco_v1v2("resnet18"), site / "a.pth.tar")
    shutil.copy(site / "a.pth.tar", site / "b.pth.tar")
    size = (site / "a.pth.tar").stat().st_size
    disk = tmpfs(size + 8 * MiB)  # room for one, not two
    monkeypatch.setenv("TORCH_HOME", str(disk.path))
    with FileServer(site) as server:
        a = download(f"{server.url}/a.pth.tar", progress=False)
        before = {p.name: p.read_bytes() for p in a.parent.iterdir()}
        with pytest.raises(MocohubError, match="no space left on the disk.*re-run the same command"):
            download(f"{server.url}/b.pth.tar", progress=False)
        assert {p.name: p.read_bytes() for p in a.parent.iterdir()} == before  # nothing half-written beside it
        assert download(f"{server.url}/a.pth.tar", progress=False) == a  # still a verified entry
        disk.resize(2 * size + 8 * MiB)
        b = download(f"{server.url}/b.pth.tar", progress=False)
        assert b == cache_file(f"{server.url}/b.pth.tar") and b.read_bytes() == (site / "b.pth.tar").read_bytes()
        with pytest.raises(MocohubError, match="no space left on the disk"):  # converting it to safetensors
            mocohub.from_pretrained(f"{server.url}/a.pth.tar", progress=False)
        assert _leftovers(disk.path) == []  # no half-converted staging folder
        disk.resize(3 * size)
        assert mocohub.from_pretrained(f"{server.url}/a.pth.tar", progress=False).num_features == 512


# -- images vanishing under a running trainer ----------------------------------------------------
def test_images_deleted_or_corrupted_mid_run_are_skipped_and_counted(tmp_path):
    source, _ = make_data(tmp_path / "data", per_class=4)  # 40 images, 5 steps per epoch
    folder = shutil.copytree(source, tmp_path / "copy")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mocohub", "train", str(folder), *TINY, *SMALL, "--epochs", "3",
                             "--cache-images", "off", "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 60
        while not (run / "steps.jsonl").exists() or not (run / "steps.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "no first step"
            time.sleep(0.01)
        classes = sorted(p for p in folder.iterdir())
        broken = [sorted(classes[c].iterdir())[0] for c in (0, 2, 4, 6, 8)]  # never two in a row
        for path in broken[:3]:
            path.unlink()
        for path in broken[3:]:
            path.write_bytes(b"\xff\xd8 not a JPEG any more")
        err = proc.communicate(timeout=90)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[-1]["skipped"] == 5
    assert {str(p) for p in broken} <= {line.rsplit(": ", 1)[1] for line in err.splitlines() if "skipped an image" in line}
