"""The settings checked against the data at start (issue 21 item 1): a table of the pure rules,
and the rules as `mocohub train` applies them to real folders."""
from __future__ import annotations

import json
import shutil

import pytest

from mocohub.cli.main import main
from mocohub.data.synthetic import make_dataset
from mocohub.training import RECIPES, TrainConfig
from mocohub.training.data_checks import (DataCheck, check_data, knn_classes_refusal, linear_scaling_lr,
                                          own_image_share, sensible_queue)

IMAGENET, CIFAR10 = 1_281_167, 50_000


@pytest.mark.parametrize("recipe, images", [
    ("moco-v1", IMAGENET), ("moco-v2", IMAGENET), ("moco-v3", IMAGENET), ("moco-v3-vit", IMAGENET),
    ("cifar", CIFAR10), ("cifar-v3", CIFAR10), ("cifar-cpu", CIFAR10),
])
def test_no_rule_fires_on_the_recipes_own_data(recipe, images):
    assert check_data(TrainConfig.from_recipe(recipe, data="d"), images) == DataCheck()


def test_the_paper_and_the_cifar_demo_are_within_the_queue_bound():
    assert RECIPES["moco-v2"].moco_k / IMAGENET == pytest.approx(0.051, abs=1e-3)
    assert RECIPES["cifar"].moco_k / CIFAR10 == pytest.approx(0.082, abs=1e-3)


@pytest.mark.parametrize("flags, images, refusal, warnings, lr_note", [
    # the case: the cifar recipe's K 4096 on 1,000 images
    ({"batch_size": 64}, 1000, "--moco-k 4096 is 410% of the 1,000 training images: about 100% of the queries "
     "meet their own image among the negatives (more keys than images); --moco-k 64 keeps it within 10%, or pass "
     "--allow-large-queue to train with it anyway", 0, None),
    # asked for: trained, and still warned (lr given: no note)
    ({"batch_size": 64, "lr": 0.06, "allow_large_queue": True}, 1000, None,
     ["--moco-k 4096 is 410% of the 1,000 training images: about 100% of the queries meet their own image among "
      "the negatives, which lowered kNN top-1 in the queue ablation (5,000 images: 38.1 at K 5 %, 36.4 at 20 %, "
      "34.8 at 82 %); --moco-k 64 keeps it within 10%"], None),
    # the ablation's K 4096 on 5,000 images at batch 256: 1,280 keys is the largest multiple within 10 %
    ({"batch_size": 256, "lr": 0.03}, 5000, None,
     ["--moco-k 4096 is 82% of the 5,000 training images: about 34% of the queries meet their own image among the "
      "negatives, which lowered kNN top-1 in the queue ablation (5,000 images: 38.1 at K 5 %, 36.4 at 20 %, 34.8 "
      "at 82 %); --moco-k 256 keeps it within 10%"],
     "lr 0.03 (0.06 x 256/512, the linear scaling rule; --lr to set it)"),  # the rule's value, given: said alike
    ({"batch_size": 256, "lr": 0.02, "moco_k": 256}, 5000, None, [], None),   # 5 %: no word
    ({"batch_size": 256, "lr": 0.02, "moco_k": 512}, 5120, None, [], None),   # 10 % exactly: no word
    ({"batch_size": 256, "lr": 0.02, "moco_k": 768}, 5120, None, 1, None),    # 15 %: warned
    # --symmetric enqueues both views: the suggestion is a multiple of 2 x batch
    ({"batch_size": 64, "lr": 0.06, "moco_k": 4096, "symmetric": True}, 10_000, None, 1, None),
    # the queue cannot be shorter than one step's keys: the batch is what to lower
    ({"batch_size": 128, "lr": 0.06, "moco_k": 128}, 1000, None,
     ["--moco-k 128 is 13% of the 1,000 training images: about 1% of the queries meet their own image among the "
      "negatives, which lowered kNN top-1 in the queue ablation (5,000 images: 38.1 at K 5 %, 36.4 at 20 %, 34.8 "
      "at 82 %); the queue cannot be shorter than one step's 128 keys: a smaller --batch-size allows a shorter "
      "one"], None),
    # fewer images than one batch: refused, before any other rule
    ({"batch_size": 512}, 500, "d has 500 images, fewer than one batch of 512: lower --batch-size (v1/v2: and "
     "--moco-k to a multiple of it)", 0, None),
    # a handful of steps
    ({"batch_size": 64, "lr": 0.06, "moco_k": 64}, 1000, None, 0, None),   # 15 steps
    ({"batch_size": 256, "lr": 0.06, "moco_k": 256, "allow_large_queue": True}, 1000, None,
     [1, "1,000 images make 3 step(s) of 256 per epoch, and the last 232 wait for a later epoch (the partial batch "
         "is dropped): a --batch-size of at most 200 gives 5 steps or more"], None),
    # the linear scaling rule, stated, and only where it chose the lr
    ({"batch_size": 64, "moco_k": 64}, CIFAR10, None, 0,
     "lr 0.0075 (0.06 x 64/512, the linear scaling rule; --lr to set it)"),
    ({"batch_size": 64, "moco_k": 64, "lr": 0.03}, CIFAR10, None, 0, None),
])
def test_rules(flags, images, refusal, warnings, lr_note):
    got = check_data(TrainConfig.from_recipe("cifar", data="d", **flags), images)
    assert got.refusal == refusal and got.lr_note == lr_note
    if isinstance(warnings, int):
        assert len(got.warnings) == warnings
    elif warnings and isinstance(warnings[0], int):  # [index, text]: the text of one of several
        assert got.warnings[warnings[0]] == warnings[1]
    else:
        assert list(got.warnings) == warnings


def test_symmetric_suggestion_is_a_multiple_of_both_views_keys():
    assert sensible_queue(10_000, 128) == 896 and sensible_queue(10_000, 64) == 960
    (warning,) = check_data(TrainConfig.from_recipe("cifar", data="d", batch_size=64, lr=0.06, moco_k=4096,
                                                    symmetric=True), 10_000).warnings
    assert warning.endswith("--moco-k 896 keeps it within 10%")


def test_own_image_share_by_hand():
    # two uniform places over [0, N): their gap N - p1 + p2 is at most K with chance (K/N)^2 / 2 (K <= N)
    assert own_image_share(500, 10_000) == pytest.approx(0.00125)
    assert own_image_share(10_000, 10_000) == pytest.approx(0.5)
    assert own_image_share(15_000, 10_000) == pytest.approx(1 - 0.125)
    assert own_image_share(20_000, 10_000) == own_image_share(90_000, 10_000) == 1.0


@pytest.mark.parametrize("recipe, batch, given, lr", [
    ("cifar", 64, None, 0.0075), ("cifar", 512, None, 0.06), ("cifar", 64, 0.06, 0.06),
    ("moco-v2", 1024, None, 0.12), ("moco-v1", 128, None, 0.015),
    ("cifar-v3", 64, None, 0.6), ("moco-v3", 256, None, 0.6),   # v3: the base lr, scaled by the model (x batch/256)
])
def test_the_linear_scaling_rule_in_the_config(recipe, batch, given, lr):
    assert TrainConfig.from_recipe(recipe, batch_size=batch, lr=given).lr == pytest.approx(lr)
    if recipe == "moco-v1":
        assert linear_scaling_lr(RECIPES[recipe], batch) == pytest.approx(lr)


@pytest.mark.parametrize("bank, val, error", [
    (["a", "b"], [], "--val V has no class sub-folders"),
    ([], [], "--val V has no class sub-folders"),  # the --val folder is named first
    ([], ["a", "b"], "--val needs labelled training images for the kNN bank: put D's images"),
    (["a", "b"], ["a", "c"], "--val V has classes ['a', 'c']..., the training folder ['a', 'b']..."),
    (["a"], ["a"], "--val V has one class (a): a kNN over one class scores 100 % whatever the features"),
    (["a", "b"], ["a", "b"], None),
])
def test_knn_classes(bank, val, error):
    got = knn_classes_refusal("V", bank, val, "D")
    assert got == error if error is None else got.startswith(error)


# -- as `mocohub train` applies them ----------------------------------------------------------------------
TINY = ["--recipe", "cifar", "--arch", "test_resnet", "--image-size", "16", "--workers", "0", "--no-progress",
        "--precision", "fp32", "--epochs", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), train_per_class=4, val_per_class=1, size=16)  # 40 images


def test_a_queue_larger_than_the_data_is_refused_before_anything_is_written(folders, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(folders[0]), *TINY, "--batch-size", "8", "--moco-k", "64", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "--moco-k 64 is 160% of the 40 training images" in err and "--allow-large-queue" in err
    assert not run.exists()


def test_asked_for_it_trains_warned_and_the_lr_follows_the_batch(folders, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(folders[0]), *TINY, "--batch-size", "8", "--moco-k", "64", "--allow-large-queue",
                 "--out", str(run)]) == 0
    out, err = capsys.readouterr()
    assert "mocohub: warning: --moco-k 64 is 160% of the 40 training images" in err
    assert "mocohub: warning: 40 images make 5 step(s)" not in err  # 5 steps: a handful
    assert "lr 0.0009375 (0.06 x 8/512, the linear scaling rule; --lr to set it)" in out + err
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert steps[0]["lr"] == pytest.approx(0.06 * 8 / 512)


def test_a_given_lr_is_used_as_is(folders, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(folders[0]), *TINY, "--batch-size", "8", "--moco-k", "8", "--lr", "0.06",
                 "--max-steps", "1", "--out", str(run)]) == 0
    out, err = capsys.readouterr()
    assert "linear scaling rule" not in out + err
    assert json.loads((run / "steps.jsonl").read_text().splitlines()[0])["lr"] == pytest.approx(0.06)


@pytest.mark.parametrize("said", ["has no class sub-folders", "has one class (circle)"])
def test_val_without_classes_or_with_one_is_refused_before_training(folders, tmp_path, capsys, said):
    train_dir, val_dir = folders
    flat, one = tmp_path / "flat", tmp_path / "one"
    flat.mkdir()
    for image in sorted(val_dir.rglob("*.png"))[:3]:
        shutil.copy(image, flat / image.name)
    shutil.copytree(train_dir / "circle", one / "circle")
    shutil.copytree(val_dir / "circle", tmp_path / "oneval" / "circle")
    data, val = (train_dir, flat) if said.startswith("has no") else (one, tmp_path / "oneval")
    run = tmp_path / "run"
    assert main(["train", str(data), *TINY, "--batch-size", "4", "--moco-k", "4", "--allow-large-queue",
                 "--val", str(val), "--out", str(run)]) == 2
    assert said in capsys.readouterr().err and not run.exists()
