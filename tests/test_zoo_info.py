"""`mocohub info` on checkpoints of both generations: runs, unfinished runs and bare files, all read
through zoo/formats.py as from_pretrained reads them."""
import json

import pytest
import torch

from mocohub.cli.main import main
from mocohub.training.config import TrainConfig
from zoo_layouts import moco_v1v2, moco_v3_resnet, tv_resnet

# torchvision's ResNet-18 without its classifier: the backbone every checkpoint below holds
R18_PARAMS = sum(p.numel() for name, p in tv_resnet("resnet18").named_parameters() if not name.startswith("fc."))


def _info(capsys, source) -> dict:
    assert main(["info", str(source), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("recipe, layout", [("cifar", moco_v1v2), ("cifar-v3", moco_v3_resnet)])
def test_an_unfinished_run_of_either_generation_reports_its_parameters(tmp_path, capsys, recipe, layout):
    cfg = TrainConfig.from_recipe(recipe, arch="resnet18", epochs=30)
    state = dict(layout("resnet18"), epoch=2, mocohub={"config": cfg.as_dict()})
    torch.save(state, tmp_path / "checkpoint.pth.tar")
    info = _info(capsys, tmp_path)
    assert info["kind"] == "run" and info["num_params"] == R18_PARAMS
    assert info["run"]["epochs_done"] == 2 and info["moco_version"] == cfg.moco_version
    assert main(["info", str(tmp_path)]) == 0
    assert "2 of 30 epochs done (resumable)" in capsys.readouterr().out


@pytest.mark.parametrize("layout, version", [(moco_v1v2, "v2"), (moco_v3_resnet, "v3")])
def test_info_reads_a_checkpoint_file_that_from_pretrained_reads(tmp_path, capsys, layout, version):
    file = tmp_path / "moco_pretrain.pth.tar"
    torch.save(layout("resnet18"), file)
    info = _info(capsys, file)
    assert info["kind"] == "checkpoint" and info["architecture"] == "resnet18"
    assert info["num_params"] == R18_PARAMS and info["moco_version"] == version and info["num_features"] == 512
    assert main(["info", str(file)]) == 0
    assert f"mocohub.from_pretrained({str(file)!r})" in capsys.readouterr().out


def test_info_of_a_missing_path_or_a_corrupt_file_is_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nothing.pth.tar")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "cut.pth.tar").write_bytes(b"PK\x03\x04 not a whole zip")
    assert main(["info", str(tmp_path / "cut.pth.tar")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "cut.pth.tar" in err
