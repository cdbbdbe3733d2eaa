"""The fast path's choices: precision from the hardware, batched augmentation that still resumes
exactly, torch.compile, and clear refusals before anything is written."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mocohub.cli.main import main
from mocohub.data.synthetic import make_dataset
from mocohub.precision import native_bf16, resolve_channels_last, resolve_precision
from mocohub.training import TrainConfig, train

TINY = ["--recipe", "cifar", "--image-size", "16", "--batch-size", "8", "--moco-k", "32", "--workers", "0",
        "--no-progress", "--log-every", "1", "--arch", "test_resnet"]  # timm's tiny ResNet
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}  # what an AVX2-only CPU reports
PART = "--- then a training run ---"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    train_dir, _ = make_dataset(tmp_path_factory.mktemp("data"), train_per_class=4, val_per_class=0, size=16)
    return train_dir


def _steps(run) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def avx2_process(data, tmp_path_factory):
    """One process on an emulated AVX2-only CPU (oneDNN's and ATen's ISA caps): two explicit bf16
    resolutions, then a 1-step training run with auto precision (one start-up for the two tests at the
    end of this file). Started with the module, so it runs beside the tests before them; calling the
    fixture waits for it: its exit code, and its stdout and stderr each split at PART."""
    tmp = tmp_path_factory.mktemp("avx2")
    code = ("import sys, warnings; warnings.simplefilter('always'); from mocohub.precision import resolve_precision;"
            "print(resolve_precision('bf16', 'cpu')); print(resolve_precision('bf16', 'cpu'));"
            f"print({PART!r}, flush=True); print({PART!r}, file=sys.stderr, flush=True);"
            f"from mocohub.cli.main import main; sys.exit(main({['train', str(data), *TINY, '--max-steps', '1', '--out', str(tmp / 'run')]!r}))")
    with open(tmp / "stdout", "w") as out, open(tmp / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=err, text=True,
                                env={**os.environ, **AVX2_ONLY})

    def finished() -> tuple[int, list[str], list[str]]:
        code = proc.wait(timeout=300)
        return code, (tmp / "stdout").read_text().split(PART), (tmp / "stderr").read_text().split(PART)

    yield finished
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_batched_augmentation_trains_and_resumes_to_equal_losses(data, tmp_path):
    base = dict(data=str(data), image_size=16, batch_size=8, moco_k=32, workers=0, progress=False, log_every=1,
                epochs=1, seed=2, aug_impl="batched", precision="fp32", arch="test_resnet")
    train(TrainConfig.from_recipe("cifar", out=str(tmp_path / "whole"), **base))
    train(TrainConfig.from_recipe("cifar", out=str(tmp_path / "split"), max_steps=2, **base))
    train(TrainConfig.from_recipe("cifar", out=str(tmp_path / "split"), **{**base, "workers": 2}))
    whole, split = _steps(tmp_path / "whole"), _steps(tmp_path / "split")
    assert len(whole) == 5 and [s["loss"] for s in split] == [s["loss"] for s in whole]
    pil = tmp_path / "pil"
    train(TrainConfig.from_recipe("cifar", out=str(pil), **{**base, "aug_impl": "pil"}))
    assert [s["loss"] for s in _steps(pil)] != [s["loss"] for s in whole]  # the flag did change the pipeline


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_aug_device_cuda_without_a_gpu_is_refused_before_anything_is_written(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(data), *TINY, "--aug-impl", "batched", "--aug-device", "cuda", "--out", str(run)]) == 2
    assert "--aug-device cuda: no CUDA GPU is visible" in capsys.readouterr().err and not run.exists()


def test_compile_without_a_compiler_is_refused_before_anything_is_written(data, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CXX", raising=False)
    run = tmp_path / "run"
    assert main(["train", str(data), *TINY, "--compile", "--out", str(run)]) == 2
    assert "--compile on the CPU needs a C++ compiler" in capsys.readouterr().err and not run.exists()


def test_compile_compiles_both_encoders_and_keeps_the_official_names(data, tmp_path):
    """Wiring only: a first compiled step takes minutes on 2 cores (bench_step --compile times it)."""
    from mocohub.training.trainer import Trainer
    t = Trainer(TrainConfig.from_recipe("cifar", data=str(data), out=str(tmp_path / "run"), image_size=16,
                                        batch_size=8, moco_k=32, workers=0, progress=False, compile=True,
                                        arch="test_resnet"))
    try:
        assert t.model.encoder_q._compiled_call_impl is not None and t.model.encoder_k._compiled_call_impl is not None
        assert all(k.startswith(("encoder_q.", "encoder_k.", "queue")) for k in t.model.state_dict())
    finally:
        t.close()


def test_split_batchnorm_keeps_channels_last():
    """The regrouping reshape copies to NCHW; without restoring the layout every later conv of the
    single-device default (8 BN groups) would convert back."""
    from mocohub.algorithm.split_bn import SplitBatchNorm
    bn = SplitBatchNorm(4, num_splits=2).train()
    x = torch.randn(8, 4, 5, 5)
    out_cl = bn(x.contiguous(memory_format=torch.channels_last))
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, SplitBatchNorm(4, num_splits=2).train()(x))
    assert bn(x).is_contiguous()


def test_split_batchnorm_counts_batches_like_batchnorm():
    from mocohub.algorithm.split_bn import SplitBatchNorm
    split, plain = SplitBatchNorm(4, num_splits=2).train(), torch.nn.BatchNorm2d(4).train()
    for _ in range(3):
        x = torch.randn(8, 4, 3, 3)
        split(x), plain(x)
    assert int(split.num_batches_tracked) == int(plain.num_batches_tracked) == 3


def test_train_json_prints_one_object_on_stdout(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(data), *TINY, "--epochs", "1", "--precision", "fp32", "--out", str(run), "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)  # stdout is exactly one object: the run's own lines went to stderr
    assert result["backbone"] == str(run / "backbone") and result["epochs"] == 1
    assert result["last_epoch"]["epoch"] == 0 and "epoch 1/1" in err and "precision fp32" in err


def test_demo_json_prints_one_object_on_stdout(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--images-per-class", "7",
                 "--workers", "0", "--precision", "fp32", "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["epochs"] == 1 and result["embedding_shape"] == [4, 96]
    assert result["gain"] == pytest.approx(result["trained_top1"] - result["random_init_top1"], abs=1e-4)
    assert "random init" not in out and "generated 10 classes" in err


def test_auto_precision_follows_the_hardware_in_the_start_line(avx2_process):
    """On a CPU without native bf16 auto is fp32 and says why; wherever this runs, auto is bf16
    exactly when the CPU has native bf16."""
    code, out, err = avx2_process()
    assert code == 0 and len(out) == len(err) == 2, err[-1][-2000:]
    assert "precision fp32 (bf16 would be emulated on AVX2)" in out[1] and "NCHW" in out[1]
    native, _ = native_bf16("cpu")
    assert resolve_precision("auto", "cpu")[0] == ("bf16" if native else "fp32")
    assert resolve_channels_last("auto", "bf16") and not resolve_channels_last("auto", "fp32")


def test_explicit_bf16_on_a_cpu_without_it_warns_once(avx2_process):
    _, out, err = avx2_process()
    assert out[0].count("('bf16', 'as asked')") == 2
    assert err[0].count("bf16 would be emulated on AVX2") == 1 and "auto (fp32 here) is faster" in err[0]


def test_a_cpu_run_augments_cached_images_in_batches_without_loader_workers(data, tmp_path):
    """The CPU defaults that trained x1.6-1.9 faster on 2 cores; streamed images still get decoding
    workers, and explicit flags win."""
    from mocohub.data.folder import DEFAULT_WORKERS
    from mocohub.training.trainer import Trainer
    base = dict(data=str(data), image_size=16, batch_size=8, moco_k=32, progress=False, arch="test_resnet")
    for i, (flags, expected) in enumerate([({}, ("batched", 0)), ({"cache_images": "off"}, ("batched", DEFAULT_WORKERS)),
                                           ({"aug_impl": "pil"}, ("pil", DEFAULT_WORKERS)),
                                           ({"workers": 1}, ("batched", 1))]):
        t = Trainer(TrainConfig.from_recipe("cifar", out=str(tmp_path / f"run{i}"), **base, **flags))
        try:
            assert (t.input.aug_impl, t.input.workers) == expected, flags
        finally:
            t.close()


def test_batched_views_are_made_in_the_training_memory_format(data, tmp_path):
    """One layout conversion per view: the batched augmentation writes channels-last itself (the
    transfer to the device then keeps it), instead of NCHW converted afterwards."""
    from mocohub.training.trainer import Trainer
    t = Trainer(TrainConfig.from_recipe("cifar", data=str(data), out=str(tmp_path / "run"), image_size=16,
                                        batch_size=8, moco_k=32, workers=0, progress=False, arch="test_resnet",
                                        precision="fp32", channels_last=True, aug_impl="batched"))
    try:
        calls, real = [], t.input.views.augment
        t.input.views.augment = lambda *args, **kwargs: (calls.append(kwargs), real(*args, **kwargs))[1]
        views = t.input.two_views(next(t.input.epoch(t.sampler, t.per_rank, 0)))
        assert calls == [{"channels_last": True}]
        assert all(v.is_contiguous(memory_format=torch.channels_last) and v.shape == (8, 3, 16, 16) for v in views)
    finally:
        t.close()
