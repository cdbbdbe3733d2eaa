"""`mocohub list` and `mocohub convert` as a person and a script use them."""
import json

import torch

from mocohub.cli.main import main
from zoo_layouts import moco_v1v2


def test_list_finds_a_model_by_its_alias(capsys):
    assert main(["list", "moco-r50"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("moco-v2-r50-800ep ") and lines[1].endswith("moco-r50")
    assert main(["list", "moco-v3-r*", "--json"]) == 0
    names = [m["name"] for m in json.loads(capsys.readouterr().out)["models"]]
    assert names == ["moco-v3-r50-100ep", "moco-v3-r50-300ep", "moco-v3-r50-1000ep"]


def test_convert_json_is_one_object(tmp_path, capsys):
    torch.save(moco_v1v2("resnet18"), tmp_path / "v2.pth.tar")
    assert main(["convert", str(tmp_path / "v2.pth.tar"), str(tmp_path / "out"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {"command": "convert", "source": str(tmp_path / "v2.pth.tar"), "to": "mocohub",
                      "format": "moco-v1/v2", "architecture": "resnet18", "pushed": None, "out": str(tmp_path / "out")}
    assert (tmp_path / "out" / "model.safetensors").is_file()
