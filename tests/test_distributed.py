"""A real 2-process torch.distributed (gloo) MoCo step, checked against a single-process emulation."""
import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from mocohub import MoCo

WORLD, PER_RANK, SEED, PERM_SEED = 2, 4, 0, 1234


def _model() -> MoCo:
    torch.manual_seed(SEED)
    model = MoCo("resnet18", dim=8, K=16, m=0.9, T=0.2, stem="cifar")
    with torch.no_grad():  # a key encoder unlike the query encoder, so the momentum update shows in the check
        for p in model.encoder_k.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(WORLD * PER_RANK, 3, 8, 8, generator=g), torch.randn(WORLD * PER_RANK, 3, 8, 8, generator=g)


def _worker(rank: int, init_file: str, out: str) -> None:
    """Both generations' step in one process group (one spawn of 2 interpreters, not two): MoCo v1/v2's
    here, MoCo v3's from test_moco_v3_distributed.py."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    _v1_step(rank, out)
    from test_moco_v3_distributed import v3_step
    v3_step(rank, f"{out}.v3")
    dist.destroy_process_group()


@functools.lru_cache(maxsize=None)
def two_process_steps() -> str:
    """Spawn the 2 ranks once per test session; the prefix of their result files (``.{rank}``, ``.v3.{rank}``)."""
    tmp = tempfile.mkdtemp(prefix="mocohub-gloo-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    out = os.path.join(tmp, "result")
    mp.start_processes(_worker, args=(os.path.join(tmp, "init"), out), nprocs=WORLD, join=True, start_method="spawn")
    return out


def _v1_step(rank: int, out: str) -> None:
    model = _model()
    net = DistributedDataParallel(model)
    im_q, im_k = _inputs()
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    torch.manual_seed(PERM_SEED + rank)  # ranks draw different permutations: rank 0's must win
    logits, labels = net(im_q[mine], im_k[mine])
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    torch.save({"logits": logits.detach(), "labels": labels, "loss": loss.detach(),
                "grads": {n: p.grad for n, p in model.encoder_q.named_parameters()},
                "state": model.state_dict()}, f"{out}.{rank}")


def _emulate() -> dict:
    """What the step must compute: per-rank BN for queries, keys on rank 0's permutation of all
    images (each rank's slice normalised separately), unshuffled; gradients averaged over ranks."""
    model = _model()
    im_q, im_k = _inputs()
    torch.manual_seed(PERM_SEED)
    perm = torch.randperm(WORLD * PER_RANK)
    with torch.no_grad():  # the momentum update, by hand: m * key + (1 - m) * query
        for k, q in zip(model.encoder_k.parameters(), model.encoder_q.parameters()):
            k.mul_(0.9).add_(q, alpha=0.1)
    with torch.no_grad():
        shuffled = torch.cat([model.encoder_k(im_k[perm.view(WORLD, -1)[r]]) for r in range(WORLD)])
        keys = F.normalize(shuffled, dim=1)[torch.argsort(perm)]
    queue = model.queue.clone()
    out = []
    for r in range(WORLD):
        mine = slice(r * PER_RANK, (r + 1) * PER_RANK)
        q = F.normalize(model.encoder_q(im_q[mine]), dim=1)
        logits = torch.cat([(q * keys[mine]).sum(1, keepdim=True), q @ queue], 1) / 0.2
        out.append((logits, F.cross_entropy(logits, torch.zeros(PER_RANK, dtype=torch.long))))
    (sum(loss for _, loss in out) / WORLD).backward()  # DDP averages gradients
    queue[:, :WORLD * PER_RANK] = keys.T
    return {"logits": [l.detach() for l, _ in out], "loss": [l.detach() for _, l in out],
            "grads": {n: p.grad for n, p in model.encoder_q.named_parameters()},
            "queue": queue, "encoder_k": {n: p for n, p in model.encoder_k.named_parameters()},
            "encoder_q": {n: p.detach() for n, p in model.encoder_q.named_parameters()}}


def test_two_process_step_matches_emulation():
    out = two_process_steps()
    expected = _emulate()
    results = [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]
    for r, got in enumerate(results):
        torch.testing.assert_close(got["logits"], expected["logits"][r], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got["loss"], expected["loss"][r], rtol=1e-4, atol=1e-5)
        for name, grad in expected["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-3, atol=1e-5, msg=name)
        torch.testing.assert_close(got["state"]["queue"], expected["queue"], rtol=1e-4, atol=1e-5)
        assert int(got["state"]["queue_ptr"]) == WORLD * PER_RANK
        for name, value in expected["encoder_k"].items():  # m * perturbed key encoder + (1 - m) * query encoder
            assert not torch.allclose(value, expected["encoder_q"][name]), name
            torch.testing.assert_close(got["state"][f"encoder_k.{name}"], value, msg=name)


def test_torchrun_trains_with_two_processes(tmp_path):
    from mocohub.data.synthetic import make_dataset
    train_dir, _ = make_dataset(tmp_path / "data", train_per_class=2, val_per_class=0, size=16)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mocohub",
           "train", str(train_dir), "--recipe", "cifar", "--arch", "test_resnet", "--image-size", "16", "--batch-size",
           "8", "--moco-k", "24", "--allow-large-queue", "--epochs", "1", "--workers", "0", "--no-progress", "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mocohub.training import load_checkpoint
    ckpt = load_checkpoint(run / "checkpoint.pth.tar")
    assert ckpt["epoch"] == 1 and ckpt["mocohub"]["world_size"] == 2
    assert int(ckpt["state_dict"]["module.queue_ptr"]) == 16  # 2 steps of 8 keys (both ranks') in a queue of 24
    assert (run / "backbone" / "model.safetensors").is_file()
