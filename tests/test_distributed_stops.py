"""Two real training processes (gloo) stop together: a signal to one rank or to all, a diverged loss
on one rank, a refused start. Each case ends in one consistent checkpoint and a clean exit, never
a hang (every wait here is bounded)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mocohub.data.synthetic import make_dataset
from mocohub.training import load_checkpoint

WORLD = 2
ARGS = ["--recipe", "cifar", "--arch", "test_resnet", "--image-size", "16", "--batch-size", "8", "--moco-k", "16", "--workers", "0",
        "--no-progress", "--log-every", "1", "--precision", "fp32"]
# Rank 1's loss turns infinite at its 8th step, the 3rd of epoch 1 (a fault only that rank sees, as an
# fp16 overflow would), after epoch 0's checkpoint.
INF_ON_RANK_1 = """
import os, sys, torch, torch.nn.functional as F
calls, real = [0], F.cross_entropy
def poisoned(*a, **k):
    calls[0] += 1
    loss = real(*a, **k)
    return loss * float("inf") if os.environ["RANK"] == "1" and calls[0] == 8 else loss
F.cross_entropy = poisoned
from mocohub.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    train_dir, val_dir = make_dataset(tmp_path_factory.mktemp("data"), train_per_class=4, val_per_class=1, size=16)
    return train_dir, val_dir  # 40 images: 5 steps of 8 per epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv: list[str], *, code: str | None = None) -> list[subprocess.Popen]:
    """Both ranks as torchrun would start them (its environment variables), with known PIDs."""
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        head = [sys.executable, "-c", code] if code else [sys.executable, "-m", "mocohub"]
        procs.append(subprocess.Popen([*head, "train", *argv], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 180) -> list[tuple[int, str]]:
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung: the processes did not stop together")
        results.append((p.returncode, out + err))
    return results


def _steps(run: Path) -> list[dict]:
    path = run / "steps.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def _wait_for_steps(run: Path, n: int, procs) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and len(_steps(run)) < n:
        assert all(p.poll() is None for p in procs), _finish(procs)
        time.sleep(0.05)


def _stopped_together(run: Path, results: list[tuple[int, str]], at_least: int) -> int:
    """Both ranks exited as interrupted, and the checkpoint holds exactly the steps logged (at least
    ``at_least``, fewer than the run's 20); their number."""
    assert [code for code, _ in results] == [130, 130], results
    state = load_checkpoint(run / "checkpoint.pth.tar")
    done = len(_steps(run))
    assert at_least <= done < 20 and state["epoch"] * 5 + state["mocohub"]["step_in_epoch"] == done
    assert int(state["state_dict"]["module.queue_ptr"]) == (done * 8) % 16
    return done


def test_sigterm_to_one_rank_or_to_all_stops_every_rank_at_the_same_step(data, tmp_path):
    """SIGTERM to rank 1 only; the same command resumes and gets SIGTERM on both ranks; the same command
    again finishes the run (3 starts of the 2 ranks: one resume stands for both cases)."""
    run = tmp_path / "run"
    command = [str(data[0]), *ARGS, "--epochs", "4", "--out", str(run)]
    done = 0
    for who in ("one rank", "all ranks"):
        procs = _start(command)
        _wait_for_steps(run, done + 2, procs)
        for p in (procs[1:] if who == "one rank" else procs):
            p.send_signal(signal.SIGTERM)
        done = _stopped_together(run, _finish(procs), done + 2)
    results = _finish(_start(command))
    assert [code for code, _ in results] == [0, 0], results
    assert [s["step"] for s in _steps(run)] == list(range(20))


def test_a_signal_to_one_rank_stops_both_at_the_next_agreed_flush(data, tmp_path):
    """With --log-every 3 the ranks agree every 3 steps and at each epoch's end (5 steps), not after
    every step: SIGTERM to rank 1 stops both after the same one of those steps, every step done
    logged and in the checkpoint."""
    run = tmp_path / "run"
    procs = _start([str(data[0]), *ARGS, "--log-every", "3", "--epochs", "4", "--out", str(run)])
    _wait_for_steps(run, 1, procs)
    procs[1].send_signal(signal.SIGTERM)
    results = _finish(procs)
    assert [code for code, _ in results] == [130, 130], results
    state = load_checkpoint(run / "checkpoint.pth.tar")
    done = state["epoch"] * 5 + state["mocohub"]["step_in_epoch"]
    assert state["mocohub"]["step_in_epoch"] in (0, 3) and 3 <= done < 20
    assert _steps(run)[-1]["step"] == done - 1 and int(state["state_dict"]["module.queue_ptr"]) == (done * 8) % 16


def test_a_loss_diverging_on_one_rank_stops_both_without_saving(data, tmp_path):
    run = tmp_path / "run"
    results = _finish(_start([str(data[0]), *ARGS, "--epochs", "2", "--out", str(run)], code=INF_ON_RANK_1))
    assert [code for code, _ in results] == [3, 3], results
    assert all("non-finite on at least one process" in text for _, text in results)
    state = load_checkpoint(run / "checkpoint.pth.tar")  # epoch 0's, untouched: nothing saved at the stop
    assert state["epoch"] == 1 and state["mocohub"]["step_in_epoch"] == 0
    assert all(v.isfinite().all() for v in state["state_dict"].values() if v.is_floating_point())


def _knn_worker(rank: int, port: int, val_dir: str, train_dir: str, out: str) -> None:
    import torch
    from mocohub.data.folder import ImageFolder, collate_images
    from mocohub.training.monitor import sharded_knn
    from mocohub.training.runtime import Runtime
    from mocohub.zoo.transforms import transform_for
    from mocohub.zoo.pretrained import pretrained_cfg_for
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rt = Runtime("cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8))
    tf = transform_for(pretrained_cfg_for(16, (0.5,) * 3, (0.25,) * 3))
    bank, val = ImageFolder(train_dir, tf), ImageFolder(val_dir, tf)
    loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_images)
    result = sharded_knn(rt, model, bank, val, loader, len(bank.classes), dim=8, k=40, t=0.1,
                         precision="fp32", channels_last=False)
    if rt.world == 1 or rank == 0:
        Path(out).write_text(json.dumps(result))
    rt.close()


def test_knn_monitor_shared_by_two_ranks_equals_one_process(data, tmp_path):
    import torch.multiprocessing as mp
    from mocohub.evaluation.knn import knn_evaluate
    import torch
    from mocohub.data.folder import ImageFolder, collate_images
    from mocohub.zoo.transforms import transform_for
    from mocohub.zoo.pretrained import pretrained_cfg_for
    out = tmp_path / "knn.json"
    mp.start_processes(_knn_worker, args=(_free_port(), str(data[1]), str(data[0]), str(out)), nprocs=WORLD,
                       join=True, start_method="spawn")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8))
    tf = transform_for(pretrained_cfg_for(16, (0.5,) * 3, (0.25,) * 3))
    loader = lambda d: torch.utils.data.DataLoader(ImageFolder(d, tf), batch_size=3, collate_fn=collate_images)
    single = knn_evaluate(model, loader(data[0]), loader(data[1]), k=40, t=0.1, precision="fp32")
    shared = json.loads(out.read_text())
    assert shared["knn_top1"] == pytest.approx(single["top1"]) and shared["knn_top5"] == pytest.approx(single["top5"])


def test_a_refused_start_exits_cleanly_on_both_ranks(data, tmp_path):
    results = _finish(_start([str(data[0]), *ARGS, "--moco-k", "12", "--out", str(tmp_path / "bad")]), timeout=60)
    assert [code for code, _ in results] == [2, 2] and all("must be divisible" in t for _, t in results)
