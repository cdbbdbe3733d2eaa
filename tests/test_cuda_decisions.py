"""Every CUDA (and CPU precision) decision as a pure function, tested on faked device properties:
no GPU is needed to know what the first GPU user's run will choose."""
import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from mocohub import precision
from mocohub.errors import MocohubError
from mocohub.precision import cpu_auto_precision, cuda_auto_precision, resolve_precision
from mocohub.training.runtime import Runtime, choose_device, gpu_index, group_options, tune_backends


@pytest.mark.parametrize("capability, gpu, expected", [
    ((7, 0), "V100", "fp16"),
    ((7, 5), "T4", "fp16"),
    ((8, 0), "A100", "bf16"),
    ((8, 6), "RTX 3090 / A10", "bf16"),
    ((8, 9), "L4", "bf16"),
    ((9, 0), "H100", "bf16"),
])
def test_cuda_auto_is_bf16_only_from_compute_capability_8(capability, gpu, expected):
    precision, why = cuda_auto_precision(capability)
    assert precision == expected, gpu
    assert f"{capability[0]}.{capability[1]}" in why
    assert ("fp16 with loss scaling" in why) == (expected == "fp16")


AMX = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
ZEN4 = frozenset({"avx2", "avx512f", "avx512_bf16"})
SKYLAKE = frozenset({"avx2", "avx512f", "avx512bw"})


@pytest.mark.parametrize("capability, flags, onednn, expected, why", [
    ("AVX512", AMX, True, "bf16", "native bf16: AMX"),                    # Sapphire Rapids
    ("AVX512", ZEN4, True, "bf16", "native bf16: AVX512-BF16"),           # AMD Zen 4, Cooper Lake
    ("AVX512", SKYLAKE, True, "fp32", "bf16 would be emulated on AVX512"),  # oneDNN emulates it there
    ("AVX2", AMX, False, "fp32", "bf16 would be emulated on AVX2"),        # capped by ONEDNN_MAX_CPU_ISA
    ("AVX2", frozenset({"avx2"}), False, "fp32", "bf16 would be emulated on AVX2"),
    ("DEFAULT", frozenset(), False, "fp32", "bf16 would be emulated on DEFAULT"),
])
def test_cpu_auto_is_bf16_where_onednn_runs_it_natively(capability, flags, onednn, expected, why):
    assert cpu_auto_precision(capability, flags, onednn) == (expected, why)


def _fake_gpu(monkeypatch, capability):
    """What torch reports on a GPU of ``capability``: is_bf16_supported() counts emulation."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or capability >= (8, 0))


def _fake_cpu(monkeypatch, flags, onednn):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: "amx_tile" in flags)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")


@pytest.mark.parametrize("device, fake, expected", [
    ("cuda:0", (7, 0), "fp16"), ("cuda:0", (7, 5), "fp16"), ("cuda:0", (8, 0), "bf16"), ("cuda:0", (9, 0), "bf16"),
    ("cpu", AMX, "bf16"), ("cpu", ZEN4, "bf16"), ("cpu", SKYLAKE, "fp32"),
])
def test_auto_on_faked_machines(monkeypatch, device, fake, expected):
    """The whole path from the device's reported facts to ``--precision auto``."""
    if device == "cpu":
        _fake_cpu(monkeypatch, fake, onednn=True)
    else:
        _fake_gpu(monkeypatch, fake)
    assert resolve_precision("auto", device)[0] == expected


def test_explicit_bf16_where_auto_differs_warns(monkeypatch):
    _fake_gpu(monkeypatch, (7, 0))
    with pytest.warns(UserWarning, match=r"compute capability 7\.0.*auto \(fp16 here\) is faster"):
        assert resolve_precision("bf16", "cuda:0") == ("bf16", "as asked")


def test_this_cpu_names_its_reason():
    chosen, why = resolve_precision("auto", "cpu")
    assert why == {"bf16": why if why.startswith("native bf16: ") else None,
                   "fp32": why if why.startswith("bf16 would be emulated on ") else None}[chosen]


@pytest.mark.parametrize("local_rank, gpus, expected", [
    (0, 1, 0), (3, 8, 3), (7, 8, 7),
    (5, 1, 0),  # SLURM per-task binding: one GPU visible to each process, LOCAL_RANK up to 7
])
def test_gpu_index(local_rank, gpus, expected):
    assert gpu_index(local_rank, gpus) == expected


@pytest.mark.parametrize("local_rank, gpus", [(2, 2), (7, 4)])
def test_gpu_index_refuses_only_real_ambiguity(local_rank, gpus):
    with pytest.raises(MocohubError, match=f"LOCAL_RANK {local_rank} has no GPU: {gpus} visible"):
        gpu_index(local_rank, gpus)


def test_a_process_bound_to_one_gpu_takes_it():
    assert choose_device(None, local_rank=5, local_world=8, cuda_count=1) == torch.device("cuda", 0)
    assert choose_device("cuda", local_rank=5, local_world=8, cuda_count=1) == torch.device("cuda", 0)


def test_nccl_is_bound_to_the_process_gpu_and_cudnn_tunes_on_cuda_only(monkeypatch):
    assert group_options(torch.device("cuda", 3)) == {"backend": "nccl", "device_id": torch.device("cuda", 3)}
    assert group_options(torch.device("cpu")) == {"backend": "gloo"}
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    tune_backends(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    tune_backends(torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark is True


def _barrier_worker(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning of the group's start, barrier or end fails the rank
        rt = Runtime(None)
        assert rt.device == torch.device("cpu") and rt.world == 2
        rt.barrier()
        assert rt.sum(rank + 1.0) == 3.0
        rt.close()


def test_two_gloo_ranks_meet_at_a_barrier_without_warnings():
    """The CPU half of the barrier fix (the NCCL half, device_id, warns only where a GPU is:
    benchmarks/gpu_check.sh runs it under torchrun with warnings as errors)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_barrier_worker, args=(port,), nprocs=2, join=True, start_method="spawn")
