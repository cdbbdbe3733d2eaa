"""MoCo v3 in the one trainer: `mocohub train` of a tiny ResNet and a tiny ViT, stopped and resumed
to the losses of an uninterrupted run, its schedules at chosen steps, its checkpoint layout, its
export loaded back, and the refusals of settings a generation cannot train."""
import json
import math
from pathlib import Path

import pytest
import timm
import torch

import mocohub
from mocohub.cli.main import main
from mocohub.data.synthetic import make_dataset
from mocohub.training import TrainConfig, load_checkpoint, train
from mocohub.training.checkpoint import save_checkpoint

# 20 training images: 2 steps of 8 per epoch, 2 epochs, 1 of them warmup
COMMON = ["--image-size", "16", "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1", "--mlp-dim", "64",
          "--moco-dim", "32", "--workers", "0", "--no-progress", "--log-every", "1", "--precision", "fp32"]
RESNET, RESNET_FEATURES = "test_resnet", 96  # timm's tiny ResNet and its pooled width
ARCHS = {
    "resnet": ["--recipe", "cifar-v3", "--arch", RESNET],  # CIFAR stem, LARS, base lr 0.6, T 1.0
    "vit": ["--recipe", "moco-v3-vit", "--arch", "test_vit", "--patch-size", "4"],  # AdamW, 1.5e-4, T 0.2
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), train_per_class=2, val_per_class=1, size=16)


def _steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Per architecture: an uninterrupted CLI run (with the kNN monitor) and one stopped after a step,
    then resumed from its folder."""
    train_dir, val_dir = data
    out = {}
    for name, argv in ARCHS.items():
        whole, split = tmp_path_factory.mktemp(f"{name}-whole"), tmp_path_factory.mktemp(f"{name}-split")
        assert main(["train", str(train_dir), *argv, *COMMON, "--out", str(whole), "--val", str(val_dir)]) == 0
        assert main(["train", str(train_dir), *argv, *COMMON, "--out", str(split), "--max-steps", "1"]) == 0
        assert len(_steps(split)) == 1
        assert main(["train", str(train_dir), *argv, *COMMON, "--out", str(split)]) == 0
        out[name] = whole, split
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_stopped_and_resumed_run_equals_the_uninterrupted_one(runs, arch):
    whole, split = runs[arch]
    a, b = _steps(whole), _steps(split)
    assert [s["step"] for s in a] == [0, 1, 2, 3]
    for key in ("loss", "acc1", "lr", "moco_m"):
        assert [s[key] for s in b] == [s[key] for s in a], key
    ca, cb = load_checkpoint(whole / "checkpoint.pth.tar"), load_checkpoint(split / "checkpoint.pth.tar")
    for key in ca["state_dict"]:
        assert torch.equal(ca["state_dict"][key], cb["state_dict"][key]), key


@pytest.mark.parametrize("arch, base_lr", [("resnet", 0.6), ("vit", 1.5e-4)])
def test_warmup_cosine_lr_and_m_cos_momentum_at_each_step(runs, arch, base_lr):
    """2 steps per epoch, 2 epochs, 1 warmup epoch, batch 8; m0 0.99 (hand values)."""
    peak = base_lr * 8 / 256  # main_moco.py's lr = base lr x batch / 256
    steps = _steps(runs[arch][0])
    assert [s["lr"] for s in steps] == pytest.approx([0.0, peak / 2, peak, peak / 2], rel=1e-12, abs=1e-15)
    c = math.cos(math.pi / 4)  # m = 1 - (1 + cos(pi * epoch / 2)) / 2 * (1 - 0.99) at epochs 0, .5, 1, 1.5
    assert [s["moco_m"] for s in steps] == pytest.approx([0.99, 1 - (1 + c) / 200, 0.995, 1 - (1 - c) / 200])
    metrics = [json.loads(line) for line in (runs[arch][0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in metrics] == pytest.approx([0.0, peak]) and all("knn_top1" in r for r in metrics)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_checkpoint_has_the_official_v3_layout(runs, arch):
    ckpt = load_checkpoint(runs[arch][0] / "checkpoint.pth.tar", generation="v3")
    assert {"epoch", "arch", "state_dict", "optimizer", "scaler", "mocohub"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["arch"] == (RESNET if arch == "resnet" else "test_vit")
    assert {k.split(".")[1] for k in ckpt["state_dict"]} == {"base_encoder", "momentum_encoder", "predictor"}
    head = "fc" if arch == "resnet" else "head"
    width = RESNET_FEATURES if arch == "resnet" else 64
    assert ckpt["state_dict"][f"module.base_encoder.{head}.0.weight"].shape == (64, width)
    model = mocohub.MoCoV3(RESNET, 32, 64, stem="cifar") if arch == "resnet" else \
        mocohub.MoCoV3("test_vit", 32, 64, T=0.2, img_size=16, patch_size=4, stop_grad_conv1=True)
    model.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}, strict=True)
    # main_moco.py --resume: scaler.load_state_dict(checkpoint['scaler']) on an enabled GradScaler
    # (an fp32/bf16 run's own scaler is disabled; its empty state would raise here)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    scaler.load_state_dict(ckpt["scaler"])
    assert scaler.get_scale() == 65536.0


def test_exported_vit_loads_in_mocohub_and_timm_with_the_trained_weights(runs):
    backbone_dir = runs["vit"][0] / "backbone"
    config = json.loads((backbone_dir / "config.json").read_text())
    assert config["architecture"] == "test_vit" and config["model_args"] == {"img_size": 16, "patch_size": 4}
    assert config["mocohub"]["moco_version"] == "v3" and config["pretrained_cfg"]["classifier"] == "head"
    ours = mocohub.from_pretrained(str(backbone_dir))
    theirs = timm.create_model("test_vit", pretrained=True, num_classes=0, img_size=16, patch_size=4,
                               pretrained_cfg_overlay=dict(file=str(backbone_dir / "model.safetensors"))).eval()
    ckpt = load_checkpoint(runs["vit"][0] / "checkpoint.pth.tar")["state_dict"]
    trained = {k.removeprefix("module.base_encoder."): v for k, v in ckpt.items()
               if k.startswith("module.base_encoder.") and not k.startswith("module.base_encoder.head.")}
    assert set(ours.state_dict()) == set(trained)
    for key, value in theirs.state_dict().items():
        assert torch.equal(value, trained[key]), key
    from_checkpoint = mocohub.from_pretrained(str(runs["vit"][0] / "checkpoint.pth.tar"))  # a run stopped unexported
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert ours(x).shape == (2, 64) and torch.equal(ours(x), theirs(x)) and torch.equal(ours(x), from_checkpoint(x))


def test_exported_resnet_is_the_base_encoder_minus_its_projector(runs):
    ckpt = load_checkpoint(runs["resnet"][0] / "checkpoint.pth.tar")["state_dict"]
    ours = mocohub.from_pretrained(str(runs["resnet"][0] / "backbone"))
    assert ours.mocohub_config["mocohub"]["stem"] == "cifar"
    trained = {k.removeprefix("module.base_encoder."): v for k, v in ckpt.items()
               if k.startswith("module.base_encoder.") and not k.startswith("module.base_encoder.fc.")}
    assert set(ours.state_dict()) == set(trained)
    assert all(torch.equal(v, trained[k]) for k, v in ours.state_dict().items())
    # the run folder itself (its checkpoint, converted) gives the same model
    run = mocohub.from_pretrained(str(runs["resnet"][0] / "checkpoint.pth.tar"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(run(x), ours(x))


def test_an_official_v3_checkpoint_resumes_at_its_epoch(runs, data, tmp_path):
    """main_moco.py's file: no mocohub extras, and its optimizer lists every parameter (the momentum
    encoder's too, which never get a gradient): it loads whole and trains the next epoch."""
    ours = load_checkpoint(runs["resnet"][0] / "checkpoint.pth.tar")
    ours["epoch"] = 1
    model = mocohub.MoCoV3(RESNET, 32, 64, stem="cifar")
    names = [n for n, _ in model.named_parameters()]
    trainable = [i for i, (_, p) in enumerate(model.named_parameters()) if p.requires_grad]
    group = ours["optimizer"]["param_groups"][0]
    official = {k: v for k, v in ours.items() if k != "mocohub"}
    official["optimizer"] = {"state": {trainable[k]: v for k, v in ours["optimizer"]["state"].items()},
                             "param_groups": [{**group, "params": list(range(len(names)))}]}
    path = save_checkpoint(official, tmp_path / "checkpoint_0000.pth.tar")
    run = tmp_path / "run"
    cfg = TrainConfig.from_recipe("cifar-v3", data=str(data[0]), out=str(run), resume=str(path), arch=RESNET,
                                  image_size=16, batch_size=8, epochs=2, warmup_epochs=1, mlp_dim=64, moco_dim=32,
                                  workers=0, progress=False, log_every=1, precision="fp32")
    train(cfg)
    assert [s["step"] for s in _steps(run)] == [2, 3] and load_checkpoint(run / "checkpoint.pth.tar")["epoch"] == 2


def test_resume_across_generations_is_refused(runs, data, tmp_path, capsys):
    train_dir = str(data[0])
    v1 = tmp_path / "v1"
    assert main(["train", train_dir, "--recipe", "cifar", "--arch", "test_resnet", "--image-size", "16", "--batch-size",
                 "8", "--moco-k", "32", "--allow-large-queue", "--workers", "0", "--no-progress", "--max-steps", "1", "--out",
                 str(v1)]) == 0
    capsys.readouterr()
    v3_file = runs["resnet"][0] / "checkpoint.pth.tar"
    assert main(["train", train_dir, *ARCHS["resnet"], *COMMON, "--out", str(tmp_path / "a"),
                 "--resume", str(v1 / "checkpoint.pth.tar")]) == 2
    err = capsys.readouterr().err
    assert "is a MoCo v1/v2 checkpoint ('module.encoder_q.*' keys) and this is a MoCo v3 run" in err
    assert "--recipe moco-v1, moco-v2, cifar or cifar-cpu" in err and not (tmp_path / "a" / "checkpoint.pth.tar").exists()
    assert main(["train", train_dir, "--recipe", "cifar", "--image-size", "16", "--batch-size", "8", "--moco-k", "32",
                 "--allow-large-queue", "--workers", "0", "--no-progress", "--out", str(tmp_path / "b"), "--resume",
                 str(v3_file)]) == 2
    err = capsys.readouterr().err
    assert "is a MoCo v3 checkpoint ('module.base_encoder.*' keys) and this is a MoCo v1/v2 run" in err
    assert "--recipe moco-v3, moco-v3-vit or cifar-v3" in err
    # the run folder's own checkpoint too: a v3 recipe pointed at a v1 run folder
    assert main(["train", train_dir, *ARCHS["resnet"], *COMMON, "--out", str(v1)]) == 2
    assert "is a MoCo v1/v2 checkpoint" in capsys.readouterr().err


V3 = ["--recipe", "cifar-v3", "--image-size", "16", "--batch-size", "8", "--workers", "0", "--no-progress"]
V1 = ["--recipe", "cifar", "--image-size", "16", "--batch-size", "8", "--moco-k", "32", "--workers", "0",
      "--no-progress"]
BAD = [
    (["--recipe", "moco-v3-vit", "--arch", "vit_small", "--image-size", "20", "--batch-size", "8"],
     "--image-size 20 is not a multiple of vit_small's patch size 16: use e.g. --image-size 16, or set --patch-size"),
    (["--recipe", "moco-v3-vit", "--arch", "test_vit", "--image-size", "16", "--patch-size", "5"],
     "is not a multiple of test_vit's patch size 5"),
    ([*V3, "--batch-size", "1"], "needs at least 2 per process: raise --batch-size"),
    ([*V3, "--arch", "efficientnet_b0"], "--arch efficientnet_b0: MoCo v3 trains a ResNet"),
    ([*V1, "--arch", "vit_small"], "--arch vit_small: MoCo v1/v2 train ResNets; a ViT needs MoCo v3"),
    ([*V1, "--warmup-epochs", "5"], "--warmup-epochs applies to MoCo v3"),
    ([*V1, "--optimizer", "lars"], "--optimizer applies to MoCo v3"),
    ([*V3, "--moco-k", "32"], "--moco-k: MoCo v3 has no queue"),
    ([*V3, "--optimizer", "sgd"], "--optimizer sgd: MoCo v3 trains with lars or adamw"),
    ([*V3, "--epochs", "5"], "--warmup-epochs 10 must be at least 0 and below --epochs 5"),
    ([*V3, "--bn-splits", "2"], "--bn-splits: MoCo v3 normalises over each process's batch"),
    ([*V3, "--patch-size", "4"], "--patch-size and --stop-grad-conv1 apply to a ViT --arch"),
    (["--recipe", "moco-v3-vit", "--arch", "test_vit", "--stem", "cifar", "--image-size", "16"],
     "--stem cifar applies to ResNets"),
    ([*V1, "--symmetric", "true", "--moco-k", "40"],
     "--moco-k 40 must be divisible by twice the global batch size (--symmetric) 16"),
]


@pytest.mark.parametrize("argv, message", BAD)
def test_bad_input_is_refused_before_anything_is_written(data, tmp_path, capsys, argv, message):
    run = tmp_path / "run"
    assert main(["train", str(data[0]), *argv, "--out", str(run)]) == 2
    assert message in capsys.readouterr().err and not run.exists()


def test_symmetric_v2_run_enqueues_both_views(data, tmp_path):
    """--symmetric: loss ctr(q1, k2) + ctr(q2, k1) (about twice the one-sided loss at the start: same
    seed, same first term), both views' keys in the queue (its pointer moves 16 a step)."""
    common = dict(data=str(data[0]), image_size=16, batch_size=8, moco_k=64, allow_large_queue=True, workers=0,
                  progress=False, log_every=1, max_steps=2, precision="fp32", epochs=2, arch="test_resnet")
    sym, one = tmp_path / "sym", tmp_path / "one"
    train(TrainConfig.from_recipe("cifar", out=str(sym), symmetric=True, **common))
    train(TrainConfig.from_recipe("cifar", out=str(one), **common))
    state = load_checkpoint(sym / "checkpoint.pth.tar")
    assert state["mocohub"]["config"]["symmetric"] is True
    assert int(state["state_dict"]["module.queue_ptr"]) == 2 * 16 % 64
    assert int(load_checkpoint(one / "checkpoint.pth.tar")["state_dict"]["module.queue_ptr"]) == 2 * 8
    assert 1.5 < _steps(sym)[0]["loss"] / _steps(one)[0]["loss"] < 2.5
