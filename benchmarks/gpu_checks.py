"""The CUDA checks of benchmarks/gpu_check.sh, as a plain script: a stock GPU image has torch,
torchvision and timm (which bring every mocohub dependency) but no pytest.

    python benchmarks/gpu_checks.py                       # every single-process check, then timings
    torchrun --nproc_per_node 1 benchmarks/gpu_checks.py --nccl   # the NCCL process group's checks
    torchrun --nproc_per_node 1 benchmarks/gpu_checks.py --nccl   # without a GPU: the same on gloo (a dry run)

Each check prints one line (ok, or FAIL with the reason) and the script exits 1 if any failed;
tests/test_cuda.py runs the same functions under pytest. Timings (SplitBatchNorm in place against
the NCHW copies, kNN scoring on the GPU against the CPU) are printed for benchmarks/README.md.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mocohub import MoCo  # noqa: E402
from mocohub.algorithm import SplitBatchNorm  # noqa: E402
from mocohub.cli.main import main as cli  # noqa: E402
from mocohub.data.synthetic import make_dataset  # noqa: E402
from mocohub.evaluation.knn import knn_predict  # noqa: E402
from mocohub.precision import resolve_precision  # noqa: E402
from mocohub.training.runtime import Runtime, group_options  # noqa: E402


def check_auto_precision() -> None:
    """bf16 from compute capability 8.0, fp16 (with the GradScaler) below it."""
    expected = "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"
    assert resolve_precision("auto", "cuda")[0] == expected, resolve_precision("auto", "cuda")


def check_runtime_takes_the_gpu_and_tunes_cudnn() -> None:
    torch.backends.cudnn.benchmark = False
    rt = Runtime(None)
    assert rt.device == torch.device("cuda", 0) and torch.backends.cudnn.benchmark


def check_step_matches_the_cpu_step() -> None:
    torch.manual_seed(0)
    cpu = MoCo("resnet18", dim=16, K=64, m=0.9, T=0.2, stem="cifar").double()
    gpu = MoCo("resnet18", dim=16, K=64, m=0.9, T=0.2, stem="cifar").double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    x_q, x_k = torch.randn(2, 8, 3, 16, 16, dtype=torch.float64)
    results = []
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        logits, labels = model(x_q.to(device), x_k.to(device))
        F.cross_entropy(logits, labels).backward()
        results.append((logits.detach().cpu(), {n: p.grad.cpu() for n, p in model.encoder_q.named_parameters()}))
    # Each device draws its own Shuffle-BN permutation, but with one BN group keys do not depend on it.
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def check_split_batchnorm_in_place_on_cuda() -> None:
    """8 BN groups on a channels-last batch of 64: the in-place path, equal to the CPU's NCHW one."""
    torch.manual_seed(0)
    x = torch.randn(64, 32, 8, 8) * 2 + 1
    grad = torch.randn_like(x)
    ref = SplitBatchNorm(32, num_splits=8).double().train()
    xr = x.double().requires_grad_()
    expected = ref(xr)  # one update of the running statistics, as each bn below
    expected.backward(grad.double())
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 6e-2)):
        bn = SplitBatchNorm(32, num_splits=8).cuda().train()
        xc = x.to("cuda", dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        out = bn(xc)
        out.backward(grad.to("cuda", dtype).contiguous(memory_format=torch.channels_last))
        assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype
        torch.testing.assert_close(out.double().cpu(), expected.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(xc.grad.double().cpu(), xr.grad, rtol=tol, atol=tol)
        torch.testing.assert_close(bn.running_mean.cpu().double(), ref.running_mean, rtol=1e-3, atol=1e-3)


def check_training_in_every_precision() -> None:
    """A 2-epoch CIFAR-recipe run per precision (and both augmentations), 8 BN groups of 4 images
    (SplitBatchNorm on CUDA, in place under channels-last), finite weights."""
    with tempfile.TemporaryDirectory() as tmp:
        train_dir, val_dir = make_dataset(Path(tmp) / "data", train_per_class=8, val_per_class=2, size=16)
        for precision, aug in (("fp32", "pil"), ("bf16", "batched"), ("fp16", "pil"), ("auto", "batched")):
            run = Path(tmp) / f"run-{precision}"
            code = cli(["train", str(train_dir), "--recipe", "cifar", "--image-size", "16", "--batch-size", "32",
                        "--bn-splits", "8", "--moco-k", "64", "--epochs", "2", "--workers", "2", "--no-progress",
                        "--precision", precision, "--aug-impl", aug, "--val", str(val_dir), "--out", str(run),
                        "--device", "cuda"])
            assert code == 0, (precision, aug)
            state = torch.load(run / "checkpoint.pth.tar", weights_only=True)
            assert state["epoch"] == 2 and all(torch.isfinite(v).all() for v in state["state_dict"].values()
                                               if v.is_floating_point()), (precision, aug)


CHECKS = [check_auto_precision, check_runtime_takes_the_gpu_and_tunes_cudnn, check_step_matches_the_cpu_step,
          check_split_batchnorm_in_place_on_cuda, check_training_in_every_precision]


def _ms(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / repeats


def timings() -> None:
    """What only a GPU can tell: the in-place SplitBatchNorm against the copies, kNN on the GPU."""
    for n, c, size in ((512, 64, 32), (128, 256, 56)):
        bn = SplitBatchNorm(c, num_splits=8).cuda().train()
        x = torch.randn(n, c, size, size, device="cuda", dtype=torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        g = torch.randn_like(x)
        in_place = _ms(lambda: bn._forward_in_place(x).backward(g))
        copies = _ms(lambda: bn._forward_regrouped(x).backward(g))
        print(f"timing: SplitBatchNorm 8 groups, {n}x{c}x{size}x{size} bf16 channels-last, forward+backward: "
              f"in place {in_place:.2f} ms, NCHW copies {copies:.2f} ms (x{copies / in_place:.2f})")
    bank = F.normalize(torch.randn(50_000, 128), dim=1)
    query = F.normalize(torch.randn(10_000, 128), dim=1)
    labels = torch.randint(0, 10, (50_000,))
    start = time.perf_counter()
    on_cpu = knn_predict(query, bank, labels, 10)
    cpu_s = time.perf_counter() - start
    on_gpu = knn_predict(query, bank.cuda(), labels, 10)  # the first call's setup counted too
    torch.cuda.synchronize()
    gpu_s = _ms(lambda: knn_predict(query, bank.cuda(), labels, 10), repeats=3) / 1e3
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-3, atol=1e-3)
    print(f"timing: kNN 10,000 queries x 50,000 bank (k 200): CPU {cpu_s:.2f} s, GPU {gpu_s:.3f} s "
          f"(x{cpu_s / gpu_s:.0f})")


def nccl_checks() -> None:
    """Under torchrun: a one-GPU NCCL group bound to its device; barrier, collectives, SyncBN under
    DDP and the sharded kNN monitor; a warning about the barrier's device is an error. (At world size 1 SyncBatchNorm
    normalises locally: the cross-GPU exchange needs a second GPU.)"""
    from torch.nn.parallel import DistributedDataParallel
    from torchvision.models import resnet18

    from mocohub.data.folder import ImageFolder, collate_images
    from mocohub.training.monitor import sharded_knn
    from mocohub.zoo.pretrained import pretrained_cfg_for
    from mocohub.zoo.transforms import transform_for

    warnings.filterwarnings("error", message=".*(barrier|device_id|device under current context).*")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(**group_options(device))
    rt = Runtime(None)
    assert rt.device == device and dist.get_backend() == ("nccl" if cuda else "gloo")
    ids = [device.index] if cuda else None
    dist.barrier(device_ids=ids)
    t = torch.ones(3, device=device)
    dist.all_reduce(t)
    assert t.tolist() == [1.0, 1.0, 1.0]
    model = resnet18(num_classes=8)
    if cuda:  # SyncBatchNorm runs on GPU tensors only
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
    net = DistributedDataParallel(model, device_ids=ids)
    x = torch.randn(32, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = net(x).float().square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with tempfile.TemporaryDirectory() as tmp:
        train_dir, val_dir = make_dataset(Path(tmp), train_per_class=6, val_per_class=2, size=16)
        tf = transform_for(pretrained_cfg_for(16, (0.5,) * 3, (0.25,) * 3))
        bank, val = ImageFolder(train_dir, tf), ImageFolder(val_dir, tf)
        backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8)).to(device)
        result = sharded_knn(rt, backbone, bank, val, lambda ds: torch.utils.data.DataLoader(
            ds, batch_size=4, collate_fn=collate_images), len(bank.classes), dim=8, k=20, t=0.1,
            precision="auto", channels_last=False)
    assert 0.0 <= result["knn_top1"] <= 100.0
    rt.barrier()
    dist.destroy_process_group()
    print(f"ok   {dist.Backend.NCCL if cuda else 'gloo (dry run)'}: one group bound to {device}, barrier, all_reduce, "
          f"{'SyncBN + ' if cuda else ''}DDP step, sharded kNN")


def run_checks(names: list[str] | None = None) -> int:
    failed = 0
    for check in CHECKS:
        if names and check.__name__ not in names:
            continue
        start = time.perf_counter()
        try:
            check()
            print(f"ok   {check.__name__} ({time.perf_counter() - start:.1f} s)")
        except Exception:  # noqa: BLE001 - every check reports, then the exit code says
            failed += 1
            print(f"FAIL {check.__name__}\n{traceback.format_exc(limit=4)}")
    return failed


if __name__ == "__main__":
    if "--nccl" in sys.argv:
        nccl_checks()
        sys.exit(0)
    if not torch.cuda.is_available():
        sys.exit("gpu_checks.py needs a CUDA GPU (only --nccl runs without one, on gloo)")
    failures = run_checks()
    timings()
    sys.exit(1 if failures else 0)
