"""Each example runs end to end on tiny inputs (as scripts, the way users run them)."""
import ast
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mocohub
from eval_fixtures import make_image_folder
from mocohub.zoo.pretrained import build_config, build_model, pretrained_cfg_for

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ex")
    torch.manual_seed(0)
    config = build_config("resnet18", num_features=512, stem="cifar", pretrained_cfg=pretrained_cfg_for(16))
    model = mocohub.save_pretrained(build_model(config), tmp / "model")
    return str(model), make_image_folder(tmp / "train", per_class=6, seed=1), make_image_folder(tmp / "val", per_class=3)


def _run(name, args):
    return runpy.run_path(str(EXAMPLES / name), run_name="example")["main"](args)


def test_finetune_classifier(tiny, tmp_path):
    model, train, val = tiny
    result = _run("finetune_classifier.py", ["--model", model, "--train", str(train), "--val", str(val),
                                             "--out", str(tmp_path / "clf"), "--epochs", "2", "--batch-size", "6",
                                             "--workers", "0"])
    assert result["epoch"] == 2 and 0.0 <= result["val_top1"] <= 100.0
    clf = mocohub.from_pretrained(str(tmp_path / "clf"), num_classes=None)
    assert clf.num_classes == 3 and clf.mocohub_config["mocohub"]["classes"] == ["class0", "class1", "class2"]


def test_nearest_neighbours(tiny, tmp_path):
    model, train, _ = tiny
    result = _run("nearest_neighbours.py", ["--model", model, "--images", str(train), "--out",
                                            str(tmp_path / "e.st"), "--k", "3", "--workers", "0",
                                            "--queries", "class1/c1_000.png"])
    neighbours = result["class1/c1_000.png"]
    assert len(neighbours) == 3 and all(path.startswith("class1/") for path, _ in neighbours)


def test_faster_rcnn(tiny):
    losses = _run("faster_rcnn.py", ["--model", tiny[0], "--image-size", "64", "--num-classes", "3"])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def test_custom_training_loop(tiny):
    losses = _run("custom_training_loop.py", ["--images", str(tiny[1]), "--arch", "resnet18", "--image-size", "16",
                                              "--batch-size", "8", "--queue", "16", "--steps", "3", "--workers", "0"])
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses)


def test_examples_document_themselves():
    for name in ("finetune_classifier.py", "nearest_neighbours.py", "faster_rcnn.py", "custom_training_loop.py"):
        assert "python examples/" + name in ast.get_docstring(ast.parse((EXAMPLES / name).read_text()))
    help_text = subprocess.run([sys.executable, str(EXAMPLES / "faster_rcnn.py"), "--help"], capture_output=True,
                               text=True, check=True).stdout  # runnable as a script, outside the test process
    assert "--model" in help_text and "SyncBN" in help_text
