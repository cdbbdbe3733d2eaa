"""Every checkpoint layout mocohub recognises loads into the backbone the official rules give."""
from __future__ import annotations

import argparse
import copy
import json
import os

import pytest
import timm
import torch
import torch.nn as nn

import mocohub
from mocohub.backbones import RESNET_ARCHS, create_resnet
from mocohub.data.augment import CIFAR_MEAN, CIFAR_STD
from mocohub.errors import MocohubError
from mocohub.zoo.formats import detect_format, infer_resnet_arch
from mocohub.zoo.pretrained import build_config, write_pretrained

from zoo_layouts import (features, linear_eval, moco_v1v2, moco_v3_resnet, moco_v3_vit, official_v1v2_backbone,
                         official_v3_backbone, tv_resnet)


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """Synthetic resnet18 checkpoints in each official layout, saved once per session."""
    root = tmp_path_factory.mktemp("checkpoints")
    ckpts = {"v1": moco_v1v2(version="v1"), "v2": moco_v1v2(), "v2-cleaned": moco_v1v2(cleaned=True),
             "v3": moco_v3_resnet()}
    paths = {}
    for name, ckpt in ckpts.items():
        paths[name] = root / f"{name}.pth.tar"
        torch.save(ckpt, paths[name])
    return ckpts, paths


@pytest.mark.parametrize("name,fmt,version", [("v1", "moco-v1/v2", "v1"), ("v2", "moco-v1/v2", "v2"),
                                              ("v2-cleaned", "moco-v1/v2", "v2")])
def test_moco_v1_v2_match_official_linear_eval_loading(saved, name, fmt, version):
    ckpts, paths = saved
    model = mocohub.from_pretrained(paths[name])
    assert detect_format(ckpts[name]) == fmt
    assert model.mocohub_config["mocohub"]["moco_version"] == version
    assert model.num_classes == 0 and model.num_features == 512 and not model.training
    assert torch.equal(features(model), features(official_v1v2_backbone(ckpts[name], "resnet18")))


def test_moco_v3_resnet_drops_projector_and_predictor(saved):
    ckpts, paths = saved
    model = mocohub.from_pretrained(paths["v3"])
    assert detect_format(ckpts["v3"]) == "moco-v3"
    assert not any(k.startswith("fc.") for k in model.state_dict())
    assert torch.equal(features(model), features(official_v3_backbone(ckpts["v3"], "resnet18")))


def test_moco_v3_vit_small_has_12_heads(tmp_path):
    ckpt, reference = moco_v3_vit("vit_small")
    torch.save(ckpt, tmp_path / "vit-s.pth.tar")
    model = mocohub.from_pretrained(tmp_path / "vit-s.pth.tar")
    assert model.blocks[0].attn.num_heads == 12 and model.num_features == 384
    assert model.pretrained_cfg["classifier"] == "head"
    assert torch.equal(features(model, size=224), features(reference, size=224))


def test_linear_eval_checkpoint_classifier_kept_dropped_or_replaced(tmp_path):
    ckpt, reference = linear_eval(num_classes=10)
    torch.save(ckpt, tmp_path / "lincls.pth.tar")
    assert detect_format(ckpt) == "linear-eval"
    kept = mocohub.from_pretrained(tmp_path / "lincls.pth.tar", num_classes=None)
    assert kept.num_classes == 10 and torch.equal(features(kept), features(reference))
    same = mocohub.from_pretrained(tmp_path / "lincls.pth.tar", num_classes=10)
    assert torch.equal(same.fc.weight, reference.fc.weight)
    pooled = mocohub.from_pretrained(tmp_path / "lincls.pth.tar")
    reference.fc = nn.Identity()
    assert pooled.num_classes == 0 and torch.equal(features(pooled), features(reference))
    fresh = mocohub.from_pretrained(tmp_path / "lincls.pth.tar", num_classes=3)
    assert fresh.fc.out_features == 3 and torch.equal(fresh.conv1.weight, reference.conv1.weight)


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_plain_state_dicts(tmp_path, library):
    source = tv_resnet("resnet34") if library == "torchvision" else timm.create_model("resnet34")
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    model = mocohub.from_pretrained(tmp_path / "plain.pth", num_classes=None)
    assert model.mocohub_config["architecture"] == "resnet34" and model.num_classes == 1000
    assert torch.equal(features(model), features(source.eval()))


@pytest.mark.parametrize("arch", RESNET_ARCHS)
def test_every_resnet_name_is_recognised_from_its_weights_alone(arch):
    with torch.device("meta"):  # layouts without memory: resnet152 included
        model = create_resnet(arch)
    assert infer_resnet_arch(model.state_dict()) == arch


def test_resnet10t_half_state_dict_loads_as_timm_resnet10t_with_its_model_args(tmp_path):
    """A mocohub name timm lacks: the config names the timm architecture and its arguments."""
    source = create_resnet("resnet10t_half", stem="cifar").eval()
    assert source.num_features == 256 and source.conv1.out_channels == 32
    torch.save(source.state_dict(), tmp_path / "half.pth")
    model = mocohub.from_pretrained(tmp_path / "half.pth")
    config = model.mocohub_config
    assert config["architecture"] == "resnet10t" and config["num_features"] == 256
    assert config["model_args"] == {"channels": [32, 64, 128, 256], "stem_width": 16}
    assert config["mocohub"]["stem"] == "cifar"
    assert torch.equal(features(model, size=32), features(source, size=32))


def _training_checkpoint(stem: str = "cifar") -> tuple[dict, nn.Module]:
    """What the mocohub trainer writes: a v2 layout plus the run config under "mocohub"."""
    encoder = create_resnet("resnet18", stem=stem)
    head = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    state = {f"module.encoder_q.{k}": v for k, v in encoder.state_dict().items()}
    state |= {f"module.encoder_q.fc.{k}": v for k, v in head.state_dict().items()}
    state |= {f"module.encoder_k.{k}": v + 1 for k, v in encoder.state_dict().items()}
    state |= {"module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    config = {"arch": "resnet18", "stem": stem, "recipe": "cifar10", "image_size": 32, "moco_version": "v2",
              "aug": "cifar"}
    return {"epoch": 3, "arch": "resnet18", "state_dict": state, "optimizer": {}, "mocohub": {"config": config}}, \
        encoder.eval()


def test_mocohub_training_checkpoint_and_run_folder(tmp_path):
    ckpt, encoder = _training_checkpoint()
    run = tmp_path / "run"
    run.mkdir()
    torch.save(ckpt, run / "checkpoint.pth.tar")
    assert detect_format(ckpt) == "mocohub-checkpoint"
    model = mocohub.from_pretrained(run)
    meta = model.mocohub_config["mocohub"]
    assert meta["stem"] == "cifar" and meta["recipe"] == "cifar10" and meta["epochs"] == 3
    assert model.pretrained_cfg["input_size"] == [3, 32, 32]
    assert model.pretrained_cfg["mean"] == list(CIFAR_MEAN) and model.pretrained_cfg["std"] == list(CIFAR_STD)
    assert torch.equal(features(model, size=32), features(encoder, size=32))
    # an export in RUN_DIR/backbone wins over the checkpoint
    other = create_resnet("resnet18", stem="cifar").eval()
    write_pretrained(run / "backbone", other.state_dict(), build_config("resnet18", num_features=512, stem="cifar"))
    assert torch.equal(features(mocohub.from_pretrained(run), size=32), features(other, size=32))


def test_features_only_with_cifar_stem_and_out_indices(tmp_path):
    ckpt, encoder = _training_checkpoint()
    torch.save(ckpt, tmp_path / "ckpt.pth.tar")
    feats = mocohub.from_pretrained(tmp_path / "ckpt.pth.tar", features_only=True, out_indices=(1, 4))
    assert feats.feature_info.channels() == [64, 512] and feats.feature_info.reduction() == [1, 8]
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        low, high = feats(x)
        assert torch.equal(high, encoder.forward_features(x)) and low.shape[-1] == 32
    with pytest.raises(MocohubError, match="out_indices"):
        mocohub.from_pretrained(tmp_path / "ckpt.pth.tar", features_only=True, out_indices=(7,))


def test_eval_transform_comes_from_pretrained_cfg(saved):
    model = mocohub.from_pretrained(saved[1]["v2"])
    names = [type(t).__name__ for t in model.eval_transform.transforms]
    resize, crop = model.eval_transform.transforms[:2]
    assert names[:2] == ["Resize", "CenterCrop"] and resize.size == 256 and tuple(crop.size) == (224, 224)
    assert repr(mocohub.transform_for(model)) == repr(model.eval_transform)


def test_unsafe_pickle_is_refused_with_a_way_out(tmp_path):
    torch.save({"state_dict": tv_resnet().state_dict(), "args": argparse.Namespace(lr=0.03)}, tmp_path / "unsafe.pth")
    with pytest.raises(MocohubError, match=r"argparse.Namespace.*weights_only=True.*mocohub convert"):
        mocohub.from_pretrained(tmp_path / "unsafe.pth")


def test_user_errors_are_mocohub_errors(tmp_path):
    with pytest.raises(MocohubError, match="Did you mean 'moco-v2-r50-800ep'.*moco-v1-r50-200ep"):
        mocohub.from_pretrained("moco-v2-r50-800")
    with pytest.raises(MocohubError, match="no such file"):
        mocohub.from_pretrained(tmp_path / "missing.pth.tar")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(MocohubError, match="not a readable torch checkpoint"):
        mocohub.from_pretrained(tmp_path / "garbage.pth")
    torch.save({"w": torch.zeros(3)}, tmp_path / "odd.pth")
    with pytest.raises(MocohubError, match="unrecognised checkpoint layout"):
        mocohub.from_pretrained(tmp_path / "odd.pth")


def test_save_pretrained_round_trip_with_model_card(saved, tmp_path):
    model = mocohub.from_pretrained(saved[1]["v2"])
    mocohub.save_pretrained(model, tmp_path / "export")
    assert {p.name for p in (tmp_path / "export").iterdir()} == {"model.safetensors", "config.json", "README.md"}
    card = (tmp_path / "export" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n") and "moco-v2" in card
    again = mocohub.from_pretrained(tmp_path / "export")
    assert torch.equal(features(again), features(model))
    assert again.mocohub_config["mocohub"] == copy.deepcopy(model.mocohub_config["mocohub"])


def test_features_only_model_is_refused_by_save_pretrained(tmp_path):
    from mocohub.errors import MocohubError
    from mocohub.zoo.pretrained import build_config, build_model, save_pretrained

    model = build_model(build_config("resnet18", num_features=512, stem="cifar"))
    save_pretrained(model, tmp_path / "export")
    features = mocohub.from_pretrained(str(tmp_path / "export"), features_only=True)
    with pytest.raises(MocohubError, match="features_only model cannot be saved"):
        save_pretrained(features, tmp_path / "broken")
    assert not (tmp_path / "broken").exists()


def _strings(obj) -> list[str]:
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in _strings(k) + _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) else []


def test_exports_carry_no_local_paths(tmp_path):
    """config.json and the model card get published by push_to_hub: no path of this machine."""
    data, home = tmp_path / "datasets" / "shapes", os.path.expanduser("~")
    ckpt, _ = _training_checkpoint()
    ckpt["mocohub"]["config"] |= {"data": str(data), "val": str(tmp_path / "val") + os.sep, "out": str(tmp_path / "run"),
                                  "resume": str(tmp_path / "run" / "checkpoint.pth.tar")}
    torch.save(ckpt, tmp_path / "ckpt.pth.tar")
    converted = mocohub.from_pretrained(tmp_path / "ckpt.pth.tar")
    meta = {"moco_version": "v2", "dataset": str(data), "out": str(tmp_path / "run"), "note": f"{home}/notes"}
    exports = {"converted": mocohub.save_pretrained(converted, tmp_path / "converted"),
               "trained": write_pretrained(tmp_path / "trained", converted.state_dict(),
                                           build_config("resnet18", num_features=512, stem="cifar", meta=meta))}
    for name, folder in exports.items():
        config = json.loads((folder / "config.json").read_text())
        card = (folder / "README.md").read_text()
        assert not [s for s in _strings(config) if os.path.isabs(s) or s.startswith("~")], name
        for text in (json.dumps(config), card):
            assert "/tmp" not in text and str(tmp_path) not in text and home not in text, name
        assert "out" not in config["mocohub"] and "resume" not in config["mocohub"]
    assert json.loads((exports["converted"] / "config.json").read_text())["mocohub"]["data"] == "shapes"
    assert json.loads((exports["trained"] / "config.json").read_text())["mocohub"]["dataset"] == "shapes"
