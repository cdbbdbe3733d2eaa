"""Each example runs end to end on tiny inputs (as scripts, the way users run them)."""
import ast
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mocohub
from eval_fixtures import make_image_folder
from mocohub.data.folder import ImageFolder
from mocohub.zoo.pretrained import build_config, build_model, pretrained_cfg_for

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ex")
    torch.manual_seed(0)
    config = build_config("resnet18", num_features=512, stem="cifar", pretrained_cfg=pretrained_cfg_for(16))
    model = mocohub.save_pretrained(build_model(config), tmp / "model")
    return str(model), make_image_folder(tmp / "train", per_class=6, seed=1), make_image_folder(tmp / "val", per_class=3)


@pytest.fixture(scope="module", autouse=True)
def help_process(tmp_path_factory):
    """`python examples/faster_rcnn.py --help` as a script, outside the test process: started with the
    module, so it runs beside the examples before test_examples_document_themselves waits for it."""
    out = tmp_path_factory.mktemp("help") / "stdout"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, str(EXAMPLES / "faster_rcnn.py"), "--help"], stdout=f,
                                stderr=subprocess.DEVNULL, text=True)

    def finished() -> tuple[int, str]:
        return proc.wait(timeout=300), out.read_text()

    yield finished
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _run(name, args):
    return runpy.run_path(str(EXAMPLES / name), run_name="example")["main"](args)


def test_finetune_classifier(tiny, tmp_path):
    model, train, val = tiny
    torch.manual_seed(0)
    result = _run("finetune_classifier.py", ["--model", model, "--train", str(train), "--val", str(val),
                                             "--out", str(tmp_path / "clf"), "--epochs", "2", "--batch-size", "6",
                                             "--workers", "0"])
    assert result["epoch"] == 2 and result["val_top1"] >= 2 * 100 / 3  # 3 colour classes: chance is 33%
    clf = mocohub.from_pretrained(str(tmp_path / "clf"), num_classes=None)
    assert clf.num_classes == 3 and clf.mocohub_config["mocohub"]["classes"] == ["class0", "class1", "class2"]
    data = ImageFolder(val, mocohub.transform_for(clf))
    images, labels = zip(*(data[i][:2] for i in range(len(data))))
    with torch.no_grad():  # the saved classifier is the one that scored
        correct = (clf.eval()(torch.stack(images)).argmax(1) == torch.tensor(labels)).sum().item()
    assert 100.0 * correct / len(labels) == pytest.approx(result["val_top1"])


def test_nearest_neighbours(tiny, tmp_path):
    model, train, _ = tiny
    result = _run("nearest_neighbours.py", ["--model", model, "--images", str(train), "--out",
                                            str(tmp_path / "e.st"), "--k", "3", "--workers", "0",
                                            "--queries", "class1/c1_000.png"])
    neighbours = result["class1/c1_000.png"]
    assert len(neighbours) == 3 and all(path.startswith("class1/") for path, _ in neighbours)


def test_faster_rcnn(tiny):
    torch.manual_seed(0)
    history = _run("faster_rcnn.py", ["--model", tiny[0], "--image-size", "64", "--num-classes", "3", "--steps", "3"])
    assert len(history) == 3
    assert set(history[0]) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(math.isfinite(v) for losses in history for v in losses.values())
    totals = [sum(losses.values()) for losses in history]
    assert totals[-1] < 0.8 * totals[0], totals  # steps on one batch lower its loss clearly (not by noise)


def test_custom_training_loop(tiny, tmp_path):
    """The loop trains: the query encoder moved, the key encoder followed it, the queue advanced."""
    args = ["--images", str(tiny[1]), "--arch", "resnet18", "--image-size", "16", "--batch-size", "8",
            "--queue", "16", "--steps", "3", "--workers", "0"]
    torch.manual_seed(0)
    losses = _run("custom_training_loop.py", [*args, "--save", str(tmp_path / "moco.pth.tar")])
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    torch.manual_seed(0)  # the model the example started from
    start = mocohub.MoCo("resnet18", dim=128, K=16, m=0.999, T=0.2, mlp=True, stem="cifar", bn_splits=4).state_dict()
    saved = torch.load(tmp_path / "moco.pth.tar", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in saved["state_dict"].items()}
    assert int(state["queue_ptr"]) == 3 * 8 % 16 and len(saved["optimizer"]["state"]) > 0
    w = "encoder_q.conv1.weight"
    q0, q1, k1 = start[w], state[w], state[w.replace("encoder_q", "encoder_k")]
    assert not torch.equal(q1, q0) and not torch.equal(k1, q0) and not torch.equal(k1, q1)
    assert (k1 - q0).norm() < 0.01 * (q1 - q0).norm()  # m = 0.999: the key encoder barely follows
    backbone = mocohub.from_pretrained(str(tmp_path / "moco.pth.tar"))  # the official layout loads
    torch.testing.assert_close(backbone.state_dict()["conv1.weight"], q1)


def test_examples_document_themselves(help_process):
    for name in ("finetune_classifier.py", "nearest_neighbours.py", "faster_rcnn.py", "custom_training_loop.py"):
        assert "python examples/" + name in ast.get_docstring(ast.parse((EXAMPLES / name).read_text()))
    code, help_text = help_process()  # runnable as a script, outside the test process
    assert code == 0 and "--model" in help_text and "SyncBN" in help_text
