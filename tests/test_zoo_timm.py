"""The timm door: each kind of export loads through the line its model card and the README give,
with the outputs of mocohub.from_pretrained; where timm cannot build the model (the CIFAR stem) the
card says so and timm refuses the files instead of loading them with a random first layer."""
import re
from pathlib import Path

import pytest
import timm
import torch

import mocohub
from mocohub.backbones import create_resnet, create_vit
from mocohub.zoo.pretrained import build_config, pretrained_cfg_for, write_pretrained
from zoo_layouts import moco_v1v2, moco_v3_vit, tv_resnet

README = Path(__file__).resolve().parents[1] / "README.md"


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics, so a layer left at its initialisation changes the output."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _export(folder: Path, model: torch.nn.Module, arch: str, stem: str = "imagenet", size: int = 64,
            model_args: dict | None = None, num_classes: int = 0) -> Path:
    num_features = getattr(model, "num_features", None) or model.fc.in_features  # timm's name, torchvision's
    config = build_config(arch, num_features=num_features, num_classes=num_classes, stem=stem,
                          pretrained_cfg=pretrained_cfg_for(size, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)))
    config["model_args"] = model_args or {}
    return write_pretrained(folder, _randomised(model).state_dict(), config)


def _converted(folder: Path, checkpoint: dict) -> Path:
    torch.save(checkpoint, folder.with_suffix(".pth.tar"))
    return mocohub.save_pretrained(mocohub.from_pretrained(folder.with_suffix(".pth.tar")), folder)


KINDS = {  # name -> (builds the export under a folder, input size)
    "imagenet-stem (a converted MoCo v2 checkpoint)": (lambda d: _converted(d, moco_v1v2("resnet18")), 64),
    "small timm ResNet test_resnet": (lambda d: _export(d, create_resnet("test_resnet"), "test_resnet"), 64),
    "small timm ResNet resnet10t": (lambda d: _export(d, create_resnet("resnet10t"), "resnet10t"), 64),
    "ViT of a mocohub run (32 px, patch 8)": (lambda d: _export(
        d, create_vit("test_vit", img_size=32, patch_size=8), "test_vit", size=32,
        model_args={"img_size": 32, "patch_size": 8}), 32),
    "ViT-S of MoCo v3 (12 heads)": (lambda d: _converted(d, moco_v3_vit("vit_small")[0]), 224),
    "a linear classifier (lincls)": (lambda d: _export(d, tv_resnet("resnet18", num_classes=3), "resnet18",
                                                       num_classes=3), 64),
}
CIFAR_KINDS = {
    "cifar-stem resnet18": lambda d: _export(d, create_resnet("resnet18", stem="cifar"), "resnet18", "cifar", 32),
    "cifar-stem test_resnet (the demo's)": lambda d: _export(d, create_resnet("test_resnet", stem="cifar"),
                                                             "test_resnet", "cifar", 32),
}


def _timm_code(text: str) -> str:
    """The local-folder timm line of a card or the README (the python block that names pretrained_cfg_overlay)."""
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "pretrained_cfg_overlay" in b]
    return block


def _run_timm_line(code: str, folder: Path, placeholder: str) -> torch.nn.Module:
    scope: dict = {}
    exec(code.replace(placeholder, str(folder)), scope)
    return scope["model"].eval()


def _outputs(model: torch.nn.Module, size: int) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model(torch.randn(2, 3, size, size))


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_of_export_loads_in_timm_as_its_card_and_the_readme_say(tmp_path, kind):
    build, size = KINDS[kind]
    folder = build(tmp_path / "export")
    expected = mocohub.from_pretrained(folder, num_classes=None)
    card = _timm_code((folder / "README.md").read_text())
    readme = _timm_code(README.read_text())
    for code, placeholder in ((card, "FOLDER"), (readme, "backbone")):
        model = _run_timm_line(code, folder, placeholder)
        assert model.num_classes == expected.num_classes
        assert torch.equal(_outputs(model, size), _outputs(expected, size)), code
        assert model.pretrained_cfg["mean"] == list(expected.pretrained_cfg["mean"])  # timm's data config too


@pytest.mark.parametrize("kind", list(CIFAR_KINDS))
def test_a_cifar_stem_export_says_timm_cannot_and_timm_refuses_it(tmp_path, kind):
    folder = CIFAR_KINDS[kind](tmp_path / "export")
    card = (folder / "README.md").read_text()
    assert "library_name: mocohub" in card and "Not with timm" in card and "pretrained_cfg_overlay" not in card
    with pytest.raises((RuntimeError, AttributeError)):  # not a silently random first layer
        _run_timm_line(_timm_code(README.read_text()), folder, "backbone")


def test_num_classes_none_keeps_the_checkpoints_classifier_as_timm_does(tmp_path):
    """timm drops None keyword arguments: num_classes=None builds the pretrained config's classifier."""
    folder = KINDS["a linear classifier (lincls)"][0](tmp_path / "clf")
    code = _timm_code(README.read_text()).replace("pretrained=True,", "pretrained=True, num_classes=None,")
    in_timm = _run_timm_line(code, folder, "backbone")
    assert in_timm.num_classes == mocohub.from_pretrained(folder, num_classes=None).num_classes == 3
    assert mocohub.from_pretrained(folder).num_classes == 0  # the default: pooled features
    assert timm.create_model("resnet18", num_classes=None).num_classes == 1000  # timm's own default cfg
