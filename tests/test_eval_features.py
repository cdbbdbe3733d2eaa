"""Feature extractor conventions of loaded MoCo backbones: every level's shape, channels, reduction."""
import pytest
import torch

import mocohub
from mocohub.errors import MocohubError
from mocohub.zoo.pretrained import build_config, build_model, pretrained_cfg_for

CHANNELS = [64, 64, 128, 256, 512]  # act1, layer1..4 of a ResNet-18


@pytest.fixture(scope="module", params=["imagenet", "cifar"])
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    stem = request.param
    size = 64 if stem == "imagenet" else 32
    config = build_config("resnet18", num_features=512, stem=stem, pretrained_cfg=pretrained_cfg_for(size))
    folder = mocohub.save_pretrained(build_model(config), tmp_path_factory.mktemp(stem) / "m")
    return stem, size, str(folder)


def test_every_level_shape_channels_and_reduction(saved):
    stem, size, folder = saved
    reductions = [2, 4, 8, 16, 32] if stem == "imagenet" else [1, 1, 2, 4, 8]
    model = mocohub.from_pretrained(folder, features_only=True, out_indices=(0, 1, 2, 3, 4))
    assert model.feature_info.channels() == CHANNELS and model.feature_info.reduction() == reductions
    assert model.feature_info.module_name() == ["act1", "layer1", "layer2", "layer3", "layer4"]
    maps = model(torch.rand(2, 3, size, size))
    assert [tuple(m.shape) for m in maps] == [(2, c, size // r, size // r) for c, r in zip(CHANNELS, reductions)]
    default = mocohub.from_pretrained(folder, features_only=True)
    assert len(default(torch.rand(1, 3, size, size))) == 5
    last_two = mocohub.from_pretrained(folder, features_only=True, out_indices=(3, 4))
    assert last_two.feature_info.channels() == [256, 512]


def test_pooled_backbone_conventions(saved):
    _, size, folder = saved
    model = mocohub.from_pretrained(folder)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        fmap = model.forward_features(x)
        pooled = model.forward_head(fmap, pre_logits=True)
        assert fmap.shape[1] == 512 and torch.allclose(pooled, model(x)) and pooled.shape == (2, 512)
        levels = mocohub.from_pretrained(folder, features_only=True, out_indices=(4,))(x)
        assert torch.allclose(levels[0], fmap)  # the last level is forward_features
    image = model.eval_transform(__import__("PIL.Image").Image.new("RGB", (3 * size, 2 * size)))
    assert image.shape == (3, size, size)


@pytest.mark.parametrize("out_indices", [(5,), (0, 7), (-6,)])
def test_levels_that_do_not_exist(saved, out_indices):
    with pytest.raises(MocohubError, match="out_indices"):
        mocohub.from_pretrained(saved[2], features_only=True, out_indices=out_indices)
