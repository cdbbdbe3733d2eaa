"""What the commands print: rounded numbers, --json objects, `mocohub info`, and the documented exit codes."""
import json

import pytest
import torch

import mocohub
from eval_fixtures import tiny_resnet
from mocohub.cli import info as info_cli
from mocohub.cli.main import build_parser, main
from mocohub.cli.output import EXIT_CODES, clean, count, duration, num, params, pct
from mocohub.errors import MocohubError
from mocohub.jsonlog import append_jsonl
from mocohub.training.config import TrainConfig


def test_numbers_are_rounded_for_people_and_cleaned_for_machines():
    assert pct(12.99999952316) == "13.0 %" and count(10000) == "10,000" and num(0.030000001) == "0.03"
    assert [duration(s) for s in (0.42, 38.4, 95, 7500)] == ["0.4 s", "38 s", "1 min 35 s", "2 h 05 min"]
    assert params(23_508_032) == "23.5 M" and params(940_000) == "940 k"
    assert clean({"top1": 12.99999952316, "x": [float("nan"), 1]}) == {"top1": 13.0, "x": [None, 1]}


def test_the_documented_exit_codes_are_the_returned_ones(monkeypatch, capsys):
    assert EXIT_CODES in build_parser().format_help()
    documented = {int(line.split()[0]) for line in EXIT_CODES.splitlines()[1:]}
    assert documented == {0, 1, 2, 3, 130}  # 1 and 3: tests/test_plot.py and tests/test_train.py
    with pytest.raises(SystemExit) as usage:
        main(["knn"])
    assert usage.value.code == 2
    assert main(["info", "moco-v9"]) == MocohubError("x").exit_code == 2

    def interrupted(source):
        raise KeyboardInterrupt

    monkeypatch.setattr(info_cli, "describe", interrupted)
    assert main(["info", "moco-r50"]) == 130
    assert capsys.readouterr().err.endswith("mocohub info: interrupted\n")


def test_info_of_a_zoo_name_needs_no_download(capsys):
    assert main(["info", "moco-r50"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "moco-v2-r50-800ep (zoo; alias moco-r50)"
    assert lines[1].split() == ["architecture", "resnet50,", "23.5", "M", "parameters"]
    assert "ImageNet linear top-1 71.1 %" in lines[4] and any("licence" in line and "mit" in line for line in lines)
    assert main(["info", "moco-v3-vit-b-300ep", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data) == list(info_cli.KEYS) and data["license"] == "cc-by-nc-4.0"
    assert data["input_size"] == [3, 224, 224] and data["metrics"] == {"imagenet_linear_top1": 76.7}


def test_info_of_an_export_counts_its_parameters(tmp_path, capsys):
    model = tiny_resnet()
    folder = mocohub.save_pretrained(model, tmp_path / "export")
    assert main(["info", str(folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "export" and data["num_params"] == sum(p.numel() for p in model.parameters())
    assert data["architecture"] == "resnet18" and data["input_size"] == [3, 16, 16] and data["num_features"] == 512
    assert main(["info", str(tmp_path)]) == 2
    assert "holds no config.json" in capsys.readouterr().err


def test_info_of_a_training_run_reads_its_checkpoint_and_metrics(tmp_path, capsys):
    cfg = TrainConfig.from_recipe("cifar", epochs=30, batch_size=64, lr=0.03)
    state = {"epoch": 2, "arch": "resnet18", "state_dict": {"module.encoder_q.conv1.weight": torch.zeros(64, 3, 3, 3),
                                                            "module.encoder_q.fc.weight": torch.zeros(128, 512)},
             "mocohub": {"config": cfg.as_dict()}}
    torch.save(state, tmp_path / "checkpoint.pth.tar")
    append_jsonl(tmp_path / "metrics.jsonl", [{"epoch": 0, "loss": 7.0, "acc1": 10.0},
                                              {"epoch": 1, "loss": 6.0, "acc1": 20.0, "knn_top1": 41.25}])
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 of 30 epochs done (resumable)" in out and "kNN top-1 41.2 %" in out
    assert "cifar (MoCo v1): batch 64, lr 0.03 cos, K 4096" in out and "1.73 k parameters" in out


def test_list_json_is_one_object_per_model(capsys):
    assert main(["list", "*v2*", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)["models"]
    assert [m["name"] for m in models] == ["moco-v2-r50-200ep", "moco-v2-r50-800ep"]
    assert models[1]["aliases"] == ["moco-r50"] and models[1]["imagenet_linear_top1"] == 71.1
