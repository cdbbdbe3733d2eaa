"""mocohub extract / knn / lincls end to end on generated folders and a saved tiny model."""
import json

import pytest

import mocohub
from eval_fixtures import make_image_folder, tiny_resnet
from mocohub.cli.main import main
from mocohub.evaluation.extract import load_embeddings

FAST = ["--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    model_dir = mocohub.save_pretrained(tiny_resnet(), tmp / "model")
    train = make_image_folder(tmp / "train", per_class=8, seed=1)
    val = make_image_folder(tmp / "val", per_class=4, seed=2)
    return str(model_dir), str(train), str(val)


def _json_lines(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_knn_command(setup, capsys):
    model, train, val = setup
    assert main(["knn", model, "--train", train, "--val", val, "--k", "5", *FAST]) == 0
    (metrics,) = _json_lines(capsys)
    assert metrics["top1"] == 100.0 and metrics["k"] == 5 and metrics["num_train"] == 24


def test_fast_lincls_writes_a_loadable_classifier(setup, tmp_path, capsys):
    model, train, val = setup
    out = tmp_path / "clf"
    assert main(["lincls", model, "--train", train, "--val", val, "--out", str(out), "--fast",
                 "--fast-aug", "1", "--fast-wd", "1e-4", *FAST]) == 0
    (metrics,) = _json_lines(capsys)
    assert metrics["top1"] == 100.0 and metrics["num_train"] == 48 and metrics["weight_decay"] == 1e-4
    assert json.loads((out / "metrics.jsonl").read_text()) == metrics
    classifier = mocohub.from_pretrained(str(out), num_classes=None)
    assert classifier.num_classes == 3
    emb = load_embeddings(mocohub.evaluation.extract.extract_embeddings(
        classifier, val, tmp_path / "logits.st", normalize=False))  # logits of the val images
    assert (emb.features.argmax(1) == emb.labels).all()
    assert main(["lincls", model, "--train", train, "--val", val, "--out", str(out), "--fast", *FAST]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_official_lincls_logs_every_epoch(setup, tmp_path, capsys):
    model, train, val = setup
    out = tmp_path / "clf"
    assert main(["lincls", model, "--train", train, "--val", val, "--out", str(out), "--epochs", "2",
                 "--lr", "0.003", "--batch-size", "8", "--milestones", "1", *FAST]) == 0
    lines = _json_lines(capsys)
    assert [m["epoch"] for m in lines] == [1, 2] and lines[1]["lr"] == pytest.approx(0.0003)
    assert mocohub.from_pretrained(str(out), num_classes=None).fc.weight.shape == (3, 512)


def test_extract_command_and_bad_input(setup, tmp_path, capsys):
    model, train, _ = setup
    out = tmp_path / "emb.safetensors"
    assert main(["extract", model, train, str(out), *FAST]) == 0
    assert load_embeddings(out).features.shape == (24, 512)
    assert main(["extract", model, train, str(out), *FAST]) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["knn", model, "--train", str(tmp_path / "empty"), "--val", train, *FAST]) == 2
    assert "no images found" in capsys.readouterr().err
    flat = make_image_folder(tmp_path / "flat", per_class=2, labelled=False)
    assert main(["knn", model, "--train", str(flat), "--val", train, *FAST]) == 2
    assert "no class sub-folders" in capsys.readouterr().err
