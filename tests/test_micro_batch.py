"""`--micro-batch`: a step in chunks equals the step over the whole batch (issue 22).

In float64 the chunked step of the models equals the whole one to rounding (v3 ViT: GradCache over the
backbone, the heads' BatchNorm1d over the whole batch; v1/v2: accumulated gradients, one enqueue, the
same BN groups). Through `mocohub train` in fp32 a micro-batched run equals the run without chunks to
float noise, resumes to the uninterrupted run bit for bit, and under 2 gloo processes equals the
2-process run without chunks and its 1-process emulation; Shuffle BN stays within each chunk; bf16
with channels-last and fp16 with the GradScaler (one scaler step per global step) equal the run
without chunks to their noise.
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
    """`mocohub train` with COMMON's flags, then ``args`` (the last of a repeated flag counts)."""
    return main(["train", str(data), *COMMON, *args, "--out", str(out)])


def _steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoint.pth.tar")["state_dict"]


def _assert_runs_agree(whole: Path, chunked: Path, loss_rel: float, weight_noise: float, *,
                       running: bool = False) -> None:
    """Per-step losses within ``loss_rel`` and every float weight within ``weight_noise`` of the
    largest weight (the BN running averages too, with ``running``)."""
    a, b = _steps(whole), _steps(chunked)
    assert [s["loss"] for s in b] == pytest.approx([s["loss"] for s in a], rel=loss_rel)
    wa, wb = _weights(whole), _weights(chunked)
    scale = max(float(v.abs().max()) for v in wa.values() if v.is_floating_point())
    for key, value in wa.items():
        if value.is_floating_point() and (running or "running_" not in key):
            assert_close(wb[key], value, rtol=0, atol=weight_noise * scale, msg=key)


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
        assert len(_steps(resumed)) == 1  # stopped after one step: the next call resumes
        assert _train(data, resumed, *args, *micro, "--micro-batch", str(MICRO)) == 0
        out[name] = whole, chunked, resumed
    return out


@pytest.mark.parametrize("name", sorted(ARGS))
def test_micro_batched_run_equals_the_whole_batch_run(runs, name):
    """fp32 through the trainer: the per-step losses and the weights to float noise (the float64 tests
    above bound the method itself to rounding)."""
    whole, chunked, _ = runs[name]
    assert [s["step"] for s in _steps(chunked)] == [0, 1, 2]
    _assert_runs_agree(whole, chunked, NOISE[name], NOISE[name])


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
    _assert_runs_agree(runs[None], runs[MICRO], NOISE["vit"], NOISE["vit"], running=True)


# -- Shuffle BN within each chunk (float64, one process) ------------------------------------------
def _key_inputs(model: MoCo) -> list[torch.Tensor]:
    """What the key encoder is called with, call by call."""
    seen: list[torch.Tensor] = []
    model.encoder_k.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    return seen


def test_shuffle_bn_shuffles_within_each_chunk_and_puts_the_keys_back():
    """Each chunk's keys are computed on that chunk's images in a shuffled order (as one GPU's share
    of a shuffled batch), and unshuffled before they meet their queries: with one BN group per chunk
    the shuffle cannot change a key, so the step equals the step without Shuffle BN (a wrong
    unshuffle pairs keys with other queries); with two groups per chunk it changes the keys."""
    x1, x2 = _views(16)
    models = {}
    for splits, shuffle in ((1, False), (1, True), (2, False), (2, True)):
        torch.manual_seed(0)
        models[splits, shuffle] = MoCo("test_resnet", 32, 256, bn_splits=splits, shuffle_bn=shuffle).double()
    seen = _key_inputs(models[1, True])
    losses = {key: _step(model, x1, x2, MICRO) for key, model in models.items()}
    assert len(seen) == BATCH // MICRO
    moved = 0
    for chunk, keys_in in zip(split(x2, BATCH // MICRO), seen):
        order = torch.cdist(keys_in.flatten(1), chunk.flatten(1)).argmin(dim=1)
        assert sorted(order.tolist()) == list(range(MICRO))  # a permutation of this chunk, nothing else
        assert torch.equal(keys_in, chunk[order])
        moved += int((order != torch.arange(MICRO)).any())
    assert moved == BATCH // MICRO  # every chunk shuffled
    _assert_same_step(models[1, False], models[1, True], losses[1, False], losses[1, True],
                      skip=("running_", "num_batches_tracked"))
    assert abs(float(losses[2, True] - losses[2, False])) > 1e-6


# -- 2 gloo processes against their 1-process emulation (float64, v1/v2) ---------------------------
WORLD, STEPS = 2, 2


def _v2_model() -> MoCo:
    """One BN group per chunk, no Shuffle BN: a sample's loss depends on its key, its chunk's BN
    statistics and the queue only."""
    torch.manual_seed(0)
    return MoCo("test_resnet", 32, 256, mlp=True, bn_splits=1, symmetric=True, shuffle_bn=False).double()


def _sgd(model: MoCo) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.5 * p.grad)


def _emulated_order(world: int, per_rank: int, micro: int) -> torch.Tensor:
    """The order of the global batch in which one process's chunks are the ranks' chunks: rank r
    holds positions r * per_rank + i, its chunk c those with i % parts == c (parts = per_rank /
    micro); one process's chunk c' holds positions c' + world * parts * j. So put rank r's chunk c
    at c' = r * parts + c."""
    parts = per_rank // micro
    positions = torch.arange(world * per_rank).view(world, micro, parts)  # [r, j, c]
    return positions.permute(1, 0, 2).reshape(-1)


def _emulation_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    model, per_rank = _v2_model(), BATCH // WORLD
    x1, x2 = (x[rank * per_rank:(rank + 1) * per_rank] for x in _views(16))
    losses = []
    for _ in range(STEPS):
        loss = _step(model, x1, x2, MICRO)  # the mean over this rank's 32: averaged, the 64's
        dist.all_reduce(loss)
        losses.append(loss / WORLD)
        _sgd(model)
    if rank == 0:
        torch.save({"losses": losses, "state": model.state_dict()}, out)
    dist.destroy_process_group()


def test_two_gloo_processes_with_micro_batches_equal_their_one_process_emulation(tmp_path):
    """2 ranks x 32 images in chunks of 16 (keys all-gathered into the queue, gradients averaged in one
    all-reduce) equal one process taking the 64 in chunks of 16 ordered so that its chunks are the
    ranks' (the same BN groups), over two steps: per-step loss, weights, and the queue (the same keys,
    in the order the processes wrote them)."""
    out = tmp_path / "rank0.pt"
    mp.start_processes(_emulation_rank, args=(_free_port(), str(out)), nprocs=WORLD, join=True,
                       start_method="spawn")
    ranks = torch.load(out)
    order = _emulated_order(WORLD, BATCH // WORLD, MICRO)
    model = _v2_model()
    x1, x2 = (x[order] for x in _views(16))
    for step in range(STEPS):
        loss = _step(model, x1, x2, MICRO)
        _sgd(model)
        assert_close(loss, ranks["losses"][step], rtol=1e-12, atol=0, msg=f"loss of step {step}")
    mine, theirs = model.state_dict(), ranks["state"]
    dim, per_rank = theirs["queue"].shape[0], BATCH // WORLD
    # the queue in steps of 2 x 64 keys (both directions): one process writes [direction, its order],
    # the processes [rank, direction, rank's 32]; both as [step, direction, sample of the batch]
    assert_close(mine["queue"].view(dim, STEPS, 2, BATCH)[..., torch.argsort(order)],
                 theirs["queue"].view(dim, STEPS, WORLD, 2, per_rank).transpose(2, 3).reshape(dim, STEPS, 2, BATCH),
                 rtol=1e-9, atol=1e-12, msg="queue")
    for name, value in theirs.items():
        if name == "queue":
            continue
        if value.is_floating_point() and "running_" not in name:
            assert_close(mine[name], value, rtol=1e-9, atol=1e-12, msg=name)
        elif not value.is_floating_point() and "num_batches" not in name:
            assert torch.equal(mine[name], value), name


# -- bf16 with channels-last, fp16 with loss scaling -----------------------------------------------
PRECISIONS = {"bf16": ["--precision", "bf16", "--channels-last", "true"], "fp16": ["--precision", "fp16"]}
# chunked against whole in the same precision, 3 steps (measured: losses within 1.4e-3 relative in
# bf16 and 2.5e-4 in fp16, weights within 0.44 % and 0.24 % of the largest weight)
LOW_NOISE = {"bf16": (5e-3, 1.5e-2), "fp16": (1e-3, 1e-2)}


@pytest.fixture(scope="module")
def precision_runs(data, tmp_path_factory):
    out = {}
    for name, args in ARGS.items():
        plain, micro = SPLITS[name]
        for precision, flags in PRECISIONS.items():
            runs = [tmp_path_factory.mktemp(f"{name}-{precision}") for _ in range(2)]
            assert _train(data, runs[0], *args, *plain, *flags) == 0
            assert _train(data, runs[1], *args, *micro, "--micro-batch", str(MICRO), *flags) == 0
            out[name, precision] = runs
    return out


@pytest.mark.parametrize("name", sorted(ARGS))
@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_micro_batches_under_autocast_equal_the_whole_batch(precision_runs, name, precision):
    """The chunks under bf16 autocast in channels-last (v2's convolutions) and under fp16 with the
    GradScaler: the same steps as without chunks to the precision's noise, and the scaler stepped
    once per global step, not once per chunk (3 updates: no overflow skipped a step here, so the
    scale stayed at its start and the growth tracker counts them)."""
    whole, chunked = precision_runs[name, precision]
    record = json.loads((chunked / "run.json").read_text())
    assert (record["precision"], record["memory_format"]) == (precision, "channels-last")
    loss_noise, weight_noise = LOW_NOISE[precision]
    _assert_runs_agree(whole, chunked, loss_noise, weight_noise)
    scaler = load_checkpoint(chunked / "checkpoint.pth.tar")["mocohub"]["scaler"]
    if precision == "fp16":
        assert (scaler["scale"], scaler["_growth_tracker"]) == (65536.0, 3)
    else:
        assert scaler == {}  # bf16 needs no loss scaling


def test_the_knn_monitor_runs_on_a_micro_batched_run(data, tmp_path):
    """The monitor embeds in batches of the micro-batch, with the run's own BN statistics, and the
    metrics carry its score at each epoch's end (2 epochs of 4 steps)."""
    run = tmp_path / "run"
    assert _train(data, run, *ARGS["vit"], "--micro-batch", str(MICRO), "--val", str(data.parent / "val"),
                  "--knn-every", "1", "--knn-k", "20", "--max-steps", "8") == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1]
    assert all(0 <= m["knn_top1"] <= 100 for m in metrics)
