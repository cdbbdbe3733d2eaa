"""Detection transfer: detectron2 key layout from the official rules, torchvision backbones that train."""
import pickle

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.ops import FrozenBatchNorm2d

import mocohub
from mocohub.cli.main import main
from mocohub.detection import detection_backbone, to_detectron2
from mocohub.errors import MocohubError
from mocohub.zoo.pretrained import build_config, build_model


def _expected_key(tv_key):
    """The rules of REFERENCE.md, written part by part (independently of the implementation)."""
    parts = tv_key.split(".")
    if not parts[0].startswith("layer"):
        parts = ["stem"] + parts
    out = []
    for i, part in enumerate(parts):
        if part.startswith("layer"):
            out.append(f"res{int(part[5:]) + 1}")
        elif part in ("bn1", "bn2", "bn3"):
            out += [f"conv{part[2]}", "norm"]
        elif part == "downsample":
            out.append("shortcut")
        elif i and parts[i - 1] == "downsample":
            out += [] if part == "0" else ["norm"]
        else:
            out.append(part)
    return ".".join(out)


@pytest.fixture(scope="module")
def official_v2():
    """A MoCo v2 pre-training checkpoint with the official key layout (ResNet-50, random weights)."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet50().state_dict()
    sd = {f"module.encoder_q.{k}": v for k, v in tv.items() if not k.startswith("fc.")}
    sd.update({"module.encoder_q.fc.0.weight": torch.randn(2048, 2048), "module.encoder_q.fc.0.bias": torch.zeros(2048),
               "module.encoder_q.fc.2.weight": torch.randn(128, 2048), "module.encoder_q.fc.2.bias": torch.zeros(128),
               "module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    sd.update({k.replace("encoder_q", "encoder_k"): v for k, v in sd.items() if "encoder_q" in k})
    return {"epoch": 200, "arch": "resnet50", "state_dict": sd}, {k: v for k, v in tv.items() if not k.startswith("fc.")}


def test_detectron2_keys_follow_the_rules(official_v2):
    ckpt, tv = official_v2
    converted = to_detectron2(ckpt["state_dict"])
    assert set(converted) == {_expected_key(k) for k in tv} and len(converted) == 318
    for key in ("stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.shortcut.weight",
                "res2.0.shortcut.norm.bias", "res5.2.conv3.norm.weight", "res4.5.conv2.weight"):
        assert key in converted
    assert not any("fc" in k for k in converted)
    for k, v in tv.items():
        assert isinstance(converted[_expected_key(k)], np.ndarray)
        assert np.array_equal(converted[_expected_key(k)], v.numpy())


def test_convert_command_writes_the_detectron2_pickle(official_v2, tmp_path, capsys):
    ckpt, tv = official_v2
    torch.save(ckpt, tmp_path / "moco_v2.pth.tar")
    out = tmp_path / "d2" / "moco.pkl"
    assert main(["convert", str(tmp_path / "moco_v2.pth.tar"), str(out), "--to", "detectron2"]) == 0
    payload = pickle.loads(out.read_bytes())
    assert payload["__author__"] == "MOCO" and payload["matching_heuristics"] is True
    assert payload["model"].keys() == {_expected_key(k) for k in tv}
    assert np.array_equal(payload["model"]["res3.1.conv2.norm.running_mean"], tv["layer2.1.bn2.running_mean"].numpy())


def test_detectron2_refuses_non_resnets():
    with pytest.raises(MocohubError, match="not a ResNet"):
        to_detectron2({"patch_embed.proj.weight": torch.zeros(1)})


def _tiny(stem="imagenet"):
    torch.manual_seed(0)
    return build_model(build_config("resnet18", num_features=512, stem=stem))


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_faster_rcnn_on_moco_backbone_trains(stem):
    model = _tiny(stem)
    backbone = detection_backbone(model)  # defaults: FPN, SyncBN, nothing frozen
    assert backbone.out_channels == 256
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in backbone.modules())
    assert torch.equal(backbone.body.layer3[1].conv2.weight, model.layer3[1].conv2.weight)
    assert all(p.requires_grad for p in backbone.parameters())
    detector = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 48)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 8.0, 30.0, 60.0]]), "labels": torch.tensor([2])}]
    losses = detector(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert backbone.body.conv1.weight.grad.abs().sum() > 0


def test_backbone_options():
    model = _tiny()
    frozen = detection_backbone(model, norm="frozen_bn", trainable_layers=2)
    assert isinstance(frozen.body.bn1, FrozenBatchNorm2d)
    trainable = {n.split(".")[1] for n, p in frozen.named_parameters() if p.requires_grad and n.startswith("body.")}
    assert trainable == {"layer3", "layer4"}
    assert torch.equal(frozen.body.bn1.running_mean, model.bn1.running_mean)
    feats = frozen(torch.rand(1, 3, 64, 64))
    assert [tuple(v.shape) for v in feats.values()] == [(1, 256, 16, 16), (1, 256, 8, 8), (1, 256, 4, 4),
                                                          (1, 256, 2, 2), (1, 256, 1, 1)]
    c5 = detection_backbone(model, fpn=False, norm="bn")
    assert c5.out_channels == 512 and c5(torch.rand(1, 3, 64, 64)).shape == (1, 512, 2, 2)
    with pytest.raises(MocohubError, match="unknown norm"):
        detection_backbone(model, norm="group")
    with pytest.raises(MocohubError, match="trainable_layers must be 0..5"):
        detection_backbone(model, trainable_layers=6)
    with pytest.raises(MocohubError, match="pass arch="):
        detection_backbone(torchvision.models.resnet18())
    assert detection_backbone(torchvision.models.resnet18(), arch="resnet18", fpn=False).out_channels == 512


def test_detection_backbone_from_a_saved_model(tmp_path):
    folder = mocohub.save_pretrained(_tiny(), tmp_path / "m")
    backbone = detection_backbone(str(folder), norm="bn", returned_layers=(2, 3, 4))
    assert list(backbone(torch.rand(1, 3, 64, 64))) == ["0", "1", "2", "pool"]
