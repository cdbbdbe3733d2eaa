"""Every `mocohub train` flag reaches the TrainConfig, and the BN-group rule of the trainer."""
import dataclasses

import pytest
import torch.nn as nn

from mocohub.algorithm import SplitBatchNorm
from mocohub.cli.main import build_parser
from mocohub.data.synthetic import make_dataset
from mocohub.errors import MocohubError
from mocohub.training import TrainConfig
from mocohub.cli.train import config_from_args
from mocohub.training.trainer import Trainer
from mocohub.training.validate import validate


def _config(argv: list[str]) -> TrainConfig:
    """The TrainConfig `mocohub train DATA argv` runs with."""
    return config_from_args(build_parser().parse_args(["train", "DATA", *argv]))


# flag and its arguments -> the fields it must set (on top of the moco-v2 recipe), and nothing else
FLAGS = [
    (["--arch", "resnet18"], {"arch": "resnet18"}),
    (["--stem", "cifar"], {"stem": "cifar"}),
    (["--epochs", "7"], {"epochs": 7}),
    (["--batch-size", "64"], {"batch_size": 64, "lr": 0.03 * 64 / 256}),  # the linear scaling rule
    (["--lr", "0.5"], {"lr": 0.5}),
    (["--schedule", "step"], {"schedule": "step"}),
    (["--lr-steps", "5", "7"], {"lr_steps": (5, 7)}),
    (["--momentum", "0.8"], {"momentum": 0.8}),
    (["--wd", "0.003"], {"weight_decay": 0.003}),
    (["--moco-dim", "64"], {"moco_dim": 64}),
    (["--moco-k", "1024"], {"moco_k": 1024}),
    (["--moco-m", "0.5"], {"moco_m": 0.5}),
    (["--moco-t", "0.3"], {"moco_t": 0.3}),
    (["--mlp", "false"], {"mlp": False}),
    (["--aug", "cifar"], {"aug": "cifar"}),
    (["--image-size", "64"], {"image_size": 64}),
    (["--crop-min", "0.5"], {"crop_min": 0.5}),
    (["--bn-groups", "4"], {"bn_groups": 4}),
    (["--symmetric", "true"], {"symmetric": True}),
    (["--shuffle-bn", "false"], {"shuffle_bn": False}),
    (["--optimizer", "lars"], {"optimizer": "lars"}),
    (["--warmup-epochs", "3"], {"warmup_epochs": 3}),
    (["--moco-m-cos", "true"], {"moco_m_cos": True}),
    (["--mlp-dim", "512"], {"mlp_dim": 512}),
    (["--stop-grad-conv1", "true"], {"stop_grad_conv1": True}),
    (["--patch-size", "8"], {"patch_size": 8}),
    (["--bn-splits", "2"], {"bn_splits": 2}),
    (["--lr-per-iteration"], {"lr_per_iteration": True}),
    (["--precision", "fp32"], {"precision": "fp32"}),
    (["--channels-last", "true"], {"channels_last": True}),
    (["--workers", "5"], {"workers": 5}),
    (["--aug-impl", "pil"], {"aug_impl": "pil"}),
    (["--aug-device", "cpu"], {"aug_device": "cpu"}),
    (["--cache-images", "off"], {"cache_images": "off"}),
    (["--compile"], {"compile": True}),
    (["--device", "cpu"], {"device": "cpu"}),
    (["--seed", "5"], {"seed": 5}),
    (["--resume", "ckpt.pth.tar"], {"resume": "ckpt.pth.tar"}),
    (["--restart"], {"restart": True}),
    (["--max-steps", "4"], {"max_steps": 4}),
    (["--val", "VAL"], {"val": "VAL"}),
    (["--knn-every", "2"], {"knn_every": 2}),
    (["--knn-k", "10"], {"knn_k": 10}),
    (["--knn-t", "0.2"], {"knn_t": 0.2}),
    (["--log-every", "3"], {"log_every": 3}),
    (["--tensorboard"], {"tensorboard": True}),
    (["--no-progress"], {"progress": False}),
    (["--out", "RUN"], {"out": "RUN"}),
    (["--allow-large-queue"], {"allow_large_queue": True}),
    (["--time-budget", "1h30m"], {"time_budget": 5400.0}),
    (["--micro-batch", "16"], {"micro_batch": 16}),
]


def _train_flags() -> set[str]:
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    return {s for a in sub.choices["train"]._actions for s in a.option_strings if s.startswith("--")} - {"--help"}


def test_every_train_flag_reaches_the_config_and_nothing_else():
    flags, base = _train_flags(), _config([])
    assert _config(["--json"]) == base  # an output switch, not a setting
    assert flags - {"--recipe", "--json"} <= {row[0][0] for row in FLAGS}, "a flag without a row in FLAGS"
    assert base == TrainConfig.from_recipe("moco-v2", data="DATA")  # no flag: the recipe, untouched
    for argv, fields in FLAGS:
        if argv[0] in flags:  # rows for flags of a newer CLI than this one are skipped
            assert dataclasses.replace(base, **fields) != base, argv  # the row changes something
            assert _config(argv) == dataclasses.replace(base, **fields), argv


def test_recipe_flag_then_overrides():
    cfg = _config(["--recipe", "moco-v1", "--mlp", "true", "--moco-t", "0.2", "--schedule", "cos"])
    assert (cfg.recipe, cfg.mlp, cfg.moco_t, cfg.schedule, cfg.aug, cfg.lr_steps, cfg.moco_k) == \
        ("moco-v1", True, 0.2, "cos", "moco-v1", (120, 160), 65536)


def test_v3_recipe_flags_and_help():
    cfg = _config(["--recipe", "moco-v3", "--epochs", "1000", "--lr", "0.3", "--wd", "1.5e-6", "--moco-m", "0.996"])
    assert (cfg.moco_version, cfg.optimizer, cfg.moco_m_cos, cfg.crop_min, cfg.epochs, cfg.lr, cfg.moco_m) == \
        ("v3", "lars", True, 0.2, 1000, 0.3, 0.996)
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    text = sub.choices["train"].format_help()
    assert "1000 epochs: --recipe moco-v3 --epochs 1000 --lr 0.3 --wd 1.5e-6 --moco-m 0.996" in text
    assert "v3: the base lr for 256 images" in " ".join(text.split())


# (global batch, processes, --bn-groups) -> BN splits per process: bn_groups over all processes,
# each group of at least 32 images, the split count dividing the per-process batch
BN_RULE = [
    (256, 1, 8, 8),   # the official 8 GPUs x 32, on one device
    (512, 1, 8, 8),   # groups of 64: never more groups than asked
    (128, 1, 8, 4),   # 4 x 32
    (96, 1, 8, 3),    # 3 x 32 (4 x 24 would be too small)
    (64, 1, 8, 2),
    (63, 1, 8, 1),    # 63 has no divisor giving groups of 32 or more
    (8, 1, 8, 1),
    (256, 1, 3, 2),   # 3 does not divide 256
    (256, 2, 8, 4),   # 4 groups per process, 8 in all
    (256, 8, 8, 1),   # one group per GPU: plain BN on each
    (256, 4, 2, 1),   # fewer groups than processes: one each
    (128, 2, 8, 2),   # 64 per process: 2 x 32
]


@pytest.mark.parametrize("batch, world, groups, splits", BN_RULE)
def test_bn_group_rule(batch, world, groups, splits):
    cfg = TrainConfig.from_recipe("cifar", batch_size=batch, moco_k=batch * 4, bn_groups=groups, precision="fp32")
    assert validate(cfg, world) == splits


def test_explicit_bn_splits_override_the_rule():
    cfg = TrainConfig.from_recipe("cifar", batch_size=8, moco_k=32, bn_splits=4, precision="fp32")
    assert validate(cfg, 1) == 4 and validate(dataclasses.replace(cfg, bn_splits=2), 2) == 2
    with pytest.raises(MocohubError, match="not divisible by 4 BN splits"):
        validate(cfg, 4)  # 2 images per process


def test_a_run_with_two_bn_groups_trains_with_split_batchnorm(tmp_path):
    """A global batch of 64 on one process: the default rule gives 2 groups of 32."""
    train_dir, _ = make_dataset(tmp_path / "data", train_per_class=7, val_per_class=0, size=16)
    cfg = TrainConfig.from_recipe("cifar", data=str(train_dir), out=str(tmp_path / "run"), image_size=16,
                                  batch_size=64, moco_k=128, allow_large_queue=True, epochs=1, workers=0, progress=False,
                                  precision="fp32")
    trainer = Trainer(cfg)
    bns = [m for m in trainer.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 * 20 and all(isinstance(m, SplitBatchNorm) and m.num_splits == 2 for m in bns)
    before = bns[0].running_var.clone()
    trainer.fit()
    assert (tmp_path / "run" / "checkpoint.pth.tar").is_file() and not bns[0].running_var.equal(before)
