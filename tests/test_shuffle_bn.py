"""`shuffle_bn`: the paper's Shuffle-BN ablation as a hyper-parameter (MoCo, the trainer, resume)."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mocohub import MoCo
from mocohub.data.synthetic import make_dataset
from mocohub.errors import MocohubError
from mocohub.training import TrainConfig
from mocohub.training.algorithms import build_algorithm
from mocohub.training.validate import check_generation
from mocohub.training.resume import config_differences
from mocohub.training.trainer import Trainer

N = 8  # batch; K = N, so one step's keys fill the queue exactly


def _keys(shuffle_bn: bool, im_k: torch.Tensor, seed: int) -> tuple[torch.Tensor, MoCo]:
    """The keys one forward enqueues (the whole queue after one step with K = N), and the model."""
    torch.manual_seed(0)
    model = MoCo("resnet18", dim=8, K=N, m=0.5, stem="cifar", bn_splits=2, shuffle_bn=shuffle_bn).double()
    encoder_k = copy.deepcopy(model.encoder_k)  # equal to encoder_q, so the momentum update keeps it
    torch.manual_seed(seed)
    model(torch.randn(N, 3, 8, 8, dtype=torch.float64), im_k)
    return model.queue.t().clone(), encoder_k


def test_without_shuffle_the_keys_are_the_key_encoder_on_the_batch_as_given():
    torch.manual_seed(1)
    im_k = torch.randn(N, 3, 8, 8, dtype=torch.float64) * 2 + 1
    keys, encoder_k = _keys(False, im_k, seed=5)
    with torch.no_grad():  # train mode: BN over each of the 2 groups (sample n in group n % 2)
        unshuffled = F.normalize(encoder_k(im_k), dim=1)
    torch.testing.assert_close(keys, unshuffled, rtol=1e-12, atol=1e-12)

    shuffled_keys, _ = _keys(True, im_k, seed=5)
    torch.manual_seed(5)
    torch.randn(N, 3, 8, 8, dtype=torch.float64)  # im_q's draw, then the shuffle's permutation
    perm = torch.randperm(N)
    with torch.no_grad():
        shuffled = F.normalize(encoder_k(im_k[perm]), dim=1)[torch.argsort(perm)]
    torch.testing.assert_close(shuffled_keys, shuffled, rtol=1e-12, atol=1e-12)
    assert (shuffled_keys - unshuffled).abs().max() > 1e-3  # other BN groups, other keys


def test_the_flag_reaches_the_model_and_v3_refuses_it():
    cfg = TrainConfig.from_recipe("cifar", batch_size=8, moco_k=16, shuffle_bn=False)
    algo = build_algorithm(cfg, steps_per_epoch=2, bn_splits=1, device=torch.device("cpu"), sync_bn=False)
    assert algo.model.shuffle_bn is False
    assert build_algorithm(dataclasses.replace(cfg, shuffle_bn=True), steps_per_epoch=2, bn_splits=1,
                           device=torch.device("cpu"), sync_bn=False).model.shuffle_bn is True
    check_generation(TrainConfig.from_recipe("cifar-v3"), 512)  # the default (True) is fine for v3
    with pytest.raises(MocohubError, match="--shuffle-bn false: MoCo v3 has no Shuffle BN"):
        check_generation(TrainConfig.from_recipe("cifar-v3", shuffle_bn=False), 512)


def test_resume_refuses_a_changed_shuffle_bn(tmp_path):
    saved = TrainConfig.from_recipe("cifar").as_dict()
    refused, changed = config_differences(saved, {**saved, "shuffle_bn": False})
    assert refused == ["shuffle_bn: True -> False"] and changed == []
    # a checkpoint from before the field existed is not compared on it
    assert config_differences({k: v for k, v in saved.items() if k != "shuffle_bn"},
                              {**saved, "shuffle_bn": False}) == ([], [])

    train_dir, _ = make_dataset(tmp_path / "data", train_per_class=2, val_per_class=0, size=8)
    cfg = TrainConfig.from_recipe("cifar", data=str(train_dir), out=str(tmp_path / "run"), image_size=8,
                                  batch_size=8, moco_k=16, epochs=1, max_steps=1, workers=0, progress=False,
                                  precision="fp32")
    Trainer(cfg).fit()
    with pytest.raises(MocohubError, match="shuffle_bn: True -> False"):
        Trainer(dataclasses.replace(cfg, shuffle_bn=False))
