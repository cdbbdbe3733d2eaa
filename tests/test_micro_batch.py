"""`--micro-batch`: a step in chunks equals the step over the whole batch (issue 22).

In float64 the chunked step of the models equals the whole one to rounding (v3 ViT: GradCache over the
backbone, the heads' BatchNorm1d over the whole batch; v1/v2: accumulated gradients, one enqueue, the
same BN groups). Through `mocohub train` in fp32 a micro-batched run equals the run without chunks to
float noise, resumes to the uninterrupted run bit for bit, and under 2 gloo processes equals the
2-process run without chunks.
"""
import contextlib
import copy
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mocohub.algorithm import MoCo, MoCoV3
from mocohub.algorithm.split_bn import SplitBatchNorm
from mocohub.cli.main import main
from mocohub.data.synthetic import make_dataset
from mocohub.errors import MocohubError
from mocohub.training import TrainConfig, load_checkpoint
from mocohub.training.microbatch import merge, micro_step, split
from mocohub.training.validate import validate
from step_equality import assert_close

BATCH, MICRO = 64, 16


def _step(model, x1, x2, micro: int | None) -> torch.Tensor:
    """One forward and backward at m 0.9, whole or in chunks; the loss."""
    model.zero_grad(set_to_none=True)
    if micro:
        loss, _ = micro_step(model, x1, x2, 0.9, micro, backward=lambda t: t.backward(),
                             autocast=contextlib.nullcontext)
        return loss
    loss, _, _ = model(x1, x2, 0.9, return_loss=True)
    loss.backward()
    return loss.detach()


def _assert_same_step(whole, chunked, loss_w, loss_c, skip: tuple[str, ...] = ()) -> None:
    """Losses, every gradient (to 1e-9, in float64) and every buffer (but those whose
    names start with ``skip``) alike."""
    assert_close(loss_c, loss_w, rtol=1e-12, atol=0, msg="loss")
    grads = [(name, p.grad, q.grad) for (name, p), q in zip(whole.named_parameters(), chunked.parameters())
             if p.grad is not None]
    scale = max(float(g.abs().max()) for _, g, _ in grads)  # a layer before a BN has a zero bias gradient
    for name, expected, actual in grads:
        assert_close(actual, expected, rtol=1e-9, atol=1e-12 * scale, msg=name)
    for (name, b), c in zip(whole.named_buffers(), chunked.buffers()):
        if not name.rsplit(".", 1)[-1].startswith(skip):
            assert_close(c.double(), b.double(), rtol=1e-9, atol=1e-12, msg=name)


def _views(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(BATCH, 3, size, size, generator=g, dtype=torch.float64) for _ in range(2))


def test_split_and_merge_interleave_the_batch():
    x = torch.arange(8)
    assert [c.tolist() for c in split(x, 4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert torch.equal(merge(split(x, 4)), x)


def test_v3_vit_chunked_step_equals_the_whole_batch_in_float64():
    """The ViT backbone has layer norm only and the heads see the whole batch: the same gradient,
    and the heads' BatchNorm1d statistics updated once per view, as without chunks."""
    torch.manual_seed(0)
    whole = MoCoV3("test_vit", 32, 64, T=0.2, img_size=32, patch_size=8).double()
    chunked = copy.deepcopy(whole)
    x1, x2 = _views()
    _assert_same_step(whole, chunked, _step(whole, x1, x2, None), _step(chunked, x1, x2, MICRO))


def test_v3_resnet_chunks_update_each_bn_statistic_once():
    """A BatchNorm backbone normalises per chunk; the first (no-gradient) pass must not count: the
    backbone's BN layers see 2 views x 4 chunks forwards, not 16."""
    torch.manual_seed(0)
    model = MoCoV3("test_resnet", 32, 64).double()
    x1, x2 = _views(16)
    _step(model, x1, x2, MICRO)
    counts = {int(bn.num_batches_tracked) for bn in model.base_encoder.modules()
              if isinstance(bn, torch.nn.BatchNorm2d)}
    assert counts == {2 * BATCH // MICRO}
    heads = {int(bn.num_batches_tracked) for bn in model.predictor.modules() if isinstance(bn, torch.nn.BatchNorm1d)}
    assert heads == {2}  # the predictor once per view, over the whole batch


@pytest.mark.parametrize("symmetric", [False, True])
def test_v1v2_chunked_step_equals_the_whole_batch_with_the_same_bn_groups(symmetric):
    """4 BN splits of the batch of 64 are the 4 chunks of 16 with 1 split each (chunk c holds samples
    c, c+4, ...: SplitBatchNorm's group c). Without Shuffle BN the keys share their queries' groups, so
    the step, the queue and its pointer are the same; the BN running averages are updated per chunk."""
    torch.manual_seed(0)
    whole = MoCo("test_resnet", 32, 256, mlp=True, bn_splits=4, symmetric=symmetric, shuffle_bn=False).double()
    chunked = copy.deepcopy(whole)
    for bn in chunked.modules():
        if isinstance(bn, SplitBatchNorm):
            bn.num_splits = 1
    x1, x2 = _views(16)
    loss_w, loss_c = _step(whole, x1, x2, None), _step(chunked, x1, x2, MICRO)
    assert int(chunked.queue_ptr) == int(whole.queue_ptr) == BATCH * (2 if symmetric else 1)
    _assert_same_step(whole, chunked, loss_w, loss_c, skip=("running_", "num_batches_tracked"))


# -- through `mocohub train`, fp32 -------------------------------------------------------------------
COMMON = ["--batch-size", str(BATCH), "--workers", "0", "--no-progress", "--log-every", "1",
          "--precision", "fp32", "--epochs", "2", "--max-steps", "3"]
ARGS = {
    "vit": ["--recipe", "moco-v3-vit", "--arch", "test_vit", "--image-size", "32", "--patch-size", "8",
            "--warmup-epochs", "0", "--mlp-dim", "64", "--moco-dim", "32", "--optimizer", "lars", "--lr", "0.6"],
    # 4 BN splits of 64 without chunks, 1 per chunk of 16: the same groups (see the float64 test)
    "v2": ["--recipe", "cifar", "--arch", "test_resnet", "--image-size", "16", "--moco-k", "256",
           "--shuffle-bn", "false", "--symmetric", "true", "--mlp", "true"],
}
SPLITS = {"vit": ([], []), "v2": (["--bn-splits", "4"], ["--bn-splits", "1"])}
# fp32 through the trainer: BN over groups of 16 maps of 1 x 1 at layer4 amplifies rounding step by step
# (v2 at step 3: the loss moved by 4e-6, a weight by 1.1e-4, measured); the ViT's layer norm does not.
# LARS, not the recipe's AdamW: Adam turns the rounding of a gradient that is zero by symmetry (the
# attention's key bias, a norm before the projector's BN) into a step of the full lr.
NOISE = {"vit": 1e-5, "v2": 1e-3}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 260 images: the queue of 256 is within them (more keys than images is refused)
    return make_dataset(tmp_path_factory.mktemp("data"), train_per_class=26, val_per_class=1, size=32)[0]


def _train(data: Path, out: Path, *args: str) -> int:
    return main(["train", str(data), *args, *COMMON, "--out", str(out)])


def _steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoint.pth.tar")["state_dict"]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Per model: 3 steps of 64 without chunks, with chunks of 16, and with chunks stopped after one
    step and resumed."""
    out = {}
    for name, args in ARGS.items():
        whole, chunked, resumed = (tmp_path_factory.mktemp(f"{name}-{kind}")
                                   for kind in ("whole", "chunked", "resumed"))
        plain, micro = SPLITS[name]
        assert _train(data, whole, *args, *plain) == 0
        assert _train(data, chunked, *args, *micro, "--micro-batch", str(MICRO)) == 0
        assert _train(data, resumed, *args, *micro, "--micro-batch", str(MICRO), "--max-steps", "1") == 0
        assert _train(data, resumed, *args, *micro, "--micro-batch", str(MICRO)) == 0
        out[name] = whole, chunked, resumed
    return out


@pytest.mark.parametrize("name", sorted(ARGS))
def test_micro_batched_run_equals_the_whole_batch_run(runs, name):
    """fp32 through the trainer: the per-step losses and the weights to float noise (the float64 tests
    above bound the method itself to rounding)."""
    whole, chunked, _ = runs[name]
    a, b = _steps(whole), _steps(chunked)
    assert [s["step"] for s in b] == [0, 1, 2]
    assert [s["loss"] for s in b] == pytest.approx([s["loss"] for s in a], rel=NOISE[name])
    wa, wb = _weights(whole), _weights(chunked)
    scale = max(float(v.abs().max()) for v in wa.values() if v.is_floating_point())
    for key, value in wa.items():
        if value.is_floating_point() and "running_" not in key:
            assert_close(wb[key], value, rtol=0, atol=NOISE[name] * scale, msg=key)


@pytest.mark.parametrize("name", sorted(ARGS))
def test_resumed_micro_batched_run_equals_the_uninterrupted_one(runs, name):
    _, chunked, resumed = runs[name]
    a, b = _steps(chunked), _steps(resumed)
    for key in ("loss", "acc1", "lr", "moco_m"):
        assert [s[key] for s in b] == [s[key] for s in a], key
    wa, wb = _weights(chunked), _weights(resumed)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_resume_with_another_micro_batch_is_refused(runs, data, capsys):
    _, chunked, _ = runs["vit"]
    assert _train(data, chunked, *ARGS["vit"], "--micro-batch", "32", "--max-steps", "4") == 2
    assert "micro_batch: 16 -> 32" in capsys.readouterr().err


@pytest.mark.parametrize("micro, bn_splits, error", [
    (24, None, "--micro-batch 24 does not divide the per-process batch 32 (--batch-size 64 over 2 process(es))"),
    (16, 3, "the micro-batch 16 is not divisible by 3 BN splits"),
])
def test_a_micro_batch_that_does_not_divide_is_refused_with_the_numbers(micro, bn_splits, error):
    cfg = TrainConfig.from_recipe("cifar", batch_size=64, moco_k=256, micro_batch=micro, bn_splits=bn_splits)
    with pytest.raises(MocohubError, match=error.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg, world=2)


@pytest.mark.parametrize("batch, micro, splits", [(256, 32, 1), (256, 64, 2), (256, None, 8), (512, 128, 2),
                                                  (512, None, 8), (256, 16, 1)])
def test_the_chunk_is_the_bn_unit(batch, micro, splits):
    """v1/v2's default BN splits counted within a chunk: the groups of the batch without chunks (8 of
    32 in 256, 8 of 64 in 512), or the chunk where it is smaller than a group."""
    cfg = TrainConfig.from_recipe("moco-v2", batch_size=batch, moco_k=4096, micro_batch=micro)
    assert validate(cfg, world=1) == splits


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, data: str, out: str, micro: int | None) -> None:
    from mocohub.training import train
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(TrainConfig.from_recipe("moco-v3-vit", data=data, out=out, arch="test_vit", image_size=32, patch_size=8,
                                  batch_size=BATCH, epochs=2, warmup_epochs=0, mlp_dim=64, moco_dim=32,
                                  optimizer="lars", lr=0.6, workers=0, progress=False, precision="fp32",
                                  log_every=1, max_steps=2, micro_batch=micro))


def test_two_gloo_processes_with_micro_batches_equal_the_two_without(data, tmp_path):
    """Each rank's 32 in chunks of 16, the loss over the all-gathered keys, the gradients averaged in
    one all-reduce per step, against DDP's own. (A 1-process run is not this run's emulation for v3:
    without SyncBN on the CPU the heads' BatchNorm1d normalise each rank's 32, not the 64.)"""
    runs = {}
    for micro in (None, MICRO):
        out = tmp_path / f"micro-{micro}"
        mp.start_processes(_rank, args=(2, _free_port(), str(data), str(out), micro), nprocs=2, join=True,
                           start_method="spawn")
        runs[micro] = out
    a, b = _steps(runs[None]), _steps(runs[MICRO])
    assert [s["loss"] for s in b] == pytest.approx([s["loss"] for s in a], rel=NOISE["vit"])
    wa, wb = _weights(runs[None]), _weights(runs[MICRO])
    scale = max(float(v.abs().max()) for v in wa.values() if v.is_floating_point())
    for key, value in wa.items():
        if value.is_floating_point():
            assert_close(wb[key], value, rtol=0, atol=NOISE["vit"] * scale, msg=key)
