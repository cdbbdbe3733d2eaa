"""The registry's facts, its lookups and the ``mocohub list`` table."""
from __future__ import annotations

import timm
import pytest

import mocohub
from mocohub.cli.main import main
from mocohub.errors import MocohubError
from mocohub.zoo.registry import ALIASES, REGISTRY

OFFICIAL = {  # REFERENCE.md section 3: name -> (epochs, top-1, hash)
    "moco-v1-r50-200ep": (200, 60.6, "md5:b251726a"), "moco-v2-r50-200ep": (200, 67.7, "md5:59fd9945"),
    "moco-v2-r50-800ep": (800, 71.1, "md5:a04e12f8"), "moco-v3-r50-100ep": (100, 68.9, None),
    "moco-v3-r50-300ep": (300, 72.8, None), "moco-v3-r50-1000ep": (1000, 74.6, None),
    "moco-v3-vit-s-300ep": (300, 73.2, None), "moco-v3-vit-b-300ep": (300, 76.7, None),
}


def test_registry_holds_the_eight_official_checkpoints():
    assert mocohub.list_models() == list(OFFICIAL)
    for name, (epochs, top1, digest) in OFFICIAL.items():
        info = mocohub.model_info(name)
        assert (info["epochs"], info["imagenet_linear_top1"], info["hash"]) == (epochs, top1, digest)
        assert info["license"] == ("cc-by-nc-4.0" if "v3" in name else "mit")
        assert info["url"].startswith("https://dl.fbaipublicfiles.com/moco")
        assert info["pretrained_cfg"]["input_size"] == [3, 224, 224]
    assert len({e.hub_name for e in REGISTRY.values()}) == len(REGISTRY)


def test_aliases_and_patterns():
    assert mocohub.model_info("moco-r50")["name"] == "moco-v2-r50-800ep"
    assert mocohub.model_info("moco-v3-r50")["name"] == "moco-v3-r50-1000ep"
    assert mocohub.list_models("*vit*") == ["moco-v3-vit-s-300ep", "moco-v3-vit-b-300ep"]
    assert set(mocohub.list_models(aliases=True)) == set(OFFICIAL) | set(ALIASES)
    with pytest.raises(MocohubError, match="Valid names: moco-v1-r50-200ep"):
        mocohub.model_info("resnet50")


@pytest.mark.parametrize("name", ["moco-v2-r50-800ep", "moco-v3-vit-s-300ep"])
def test_parameter_counts_match_the_architecture(name):
    entry = REGISTRY[name]
    model = timm.create_model(entry.arch, num_classes=0, **entry.model_args)
    assert sum(p.numel() for p in model.parameters()) == entry.num_params


def test_zoo_url_can_point_at_a_mirror(monkeypatch):
    monkeypatch.setenv("MOCOHUB_ZOO_URL", "http://127.0.0.1:9/mirror/")
    assert REGISTRY["moco-v1-r50-200ep"].url == \
        "http://127.0.0.1:9/mirror/moco/moco_checkpoints/moco_v1_200ep/moco_v1_200ep_pretrain.pth.tar"


def test_cli_list(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["name", "arch", "moco"] and len(lines) == 1 + len(OFFICIAL)
    assert "moco-r50" in next(line for line in lines if line.startswith("moco-v2-r50-800ep"))
    assert main(["list", "*v3-r50*", "-v"]) == 0
    out = capsys.readouterr().out
    assert "moco-v3-r50-300ep" in out and "no hash published" in out and "moco-v2" not in out


def test_cli_convert_reports_user_errors_in_one_line(capsys, tmp_path):
    assert main(["convert", "moco-v9", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mocohub convert: error: unknown model 'moco-v9'") and err.count("\n") == 1
