"""mocohub.train(...): the command as a function, returning the run; the same settings, checks and resume."""
import json

import pytest
import torch

import mocohub
from mocohub.cli.main import build_parser
from mocohub.cli.train import config_from_args
from mocohub.data.synthetic import make_dataset

TINY = dict(image_size=16, batch_size=8, moco_k=8, workers=0, progress=False, log_every=1, arch="test_resnet",
            cache_images="off")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), train_per_class=4, val_per_class=2, size=16)[0]


def test_train_returns_the_run_folder_its_epoch_rows_and_a_loadable_backbone(data, tmp_path):
    run = mocohub.train(data, out=tmp_path / "run", epochs=2, max_steps=7, **TINY)
    assert run.folder == tmp_path / "run" and run.backbone == tmp_path / "run" / "backbone"
    assert [row["epoch"] for row in run.metrics] == [0]  # 5 steps an epoch: stopped in the second
    assert run.metrics == [json.loads(line) for line in (run.folder / "metrics.jsonl").read_text().splitlines()]
    resumed = mocohub.train(data, out=tmp_path / "run", epochs=2, **TINY)  # the same folder: resumed
    assert [row["epoch"] for row in resumed.metrics] == [0, 1]
    model = resumed.load()
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, model.num_features)


def test_the_settings_are_the_commands_and_a_wrong_name_lists_the_valid_ones(data, tmp_path):
    from mocohub.api import train_config
    args = build_parser().parse_args(["train", str(data), "--recipe", "cifar", "--batch-size", "64"])
    assert train_config(data, batch_size=64) == config_from_args(args)  # lr scaled by the same rule
    with pytest.raises(mocohub.MocohubError, match=r"unknown setting 'bach_size' \(did you mean batch_size\?\); "
                                                   r"valid: .*\bmoco_k\b"):
        mocohub.train(data, out=tmp_path / "never", bach_size=8)
    assert not (tmp_path / "never").exists()
