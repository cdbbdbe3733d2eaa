"""mocohub extract / knn / lincls end to end on generated folders and a saved tiny model."""
import json
import re

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


def test_knn_prints_a_sentence_and_json_on_request(setup, capsys):
    model, train, val = setup
    assert main(["knn", model, "--train", train, "--val", val, "--k", "5", *FAST]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"kNN top-1 100\.0 %, top-5 100\.0 % \(k=5, 12 val images, (fp32|bf16), [0-9.]+ s\)\n", out)
    assert main(["knn", model, "--train", train, "--val", val, "--k", "5", "--precision", "fp32", "--json", *FAST]) == 0
    (metrics,) = _json_lines(capsys)
    assert metrics["top1"] == 100.0 and metrics["k"] == 5 and metrics["num_train"] == 24
    assert metrics["precision"] == "fp32" and metrics["seconds"] > 0


def test_fast_lincls_writes_a_loadable_classifier(setup, tmp_path, capsys, monkeypatch):
    model, train, val = setup
    monkeypatch.chdir(tmp_path)  # no --out: a fresh runs/lincls-<model>-<time>
    assert main(["lincls", model, "--train", train, "--val", val, "--fast", "--fast-aug", "1",
                 "--fast-wd", "1e-4", "--json", *FAST]) == 0
    (printed,) = _json_lines(capsys)
    out = tmp_path / printed["out"]
    assert out.parent == tmp_path / "runs" and out.name.startswith("lincls-model-")
    assert printed["top1"] == 100.0 and printed["num_train"] == 48 and printed["weight_decay"] == 1e-4
    logged = json.loads((out / "metrics.jsonl").read_text())
    assert logged == {k: v for k, v in printed.items() if k not in ("model", "out", "precision", "seconds")}
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
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["epoch 1/2", "epoch 2/2"] and "lr 0.0003" in lines[1]
    assert lines[2].startswith("linear eval (v1, 2 epochs): top-1 ") and str(out) in lines[3]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in logged] == [1, 2] and logged[1]["lr"] == pytest.approx(0.0003)
    assert mocohub.from_pretrained(str(out), num_classes=None).fc.weight.shape == (3, 512)


def test_extract_command_and_bad_input(setup, tmp_path, capsys):
    model, train, _ = setup
    out = tmp_path / "emb.safetensors"
    assert main(["extract", model, train, str(out), *FAST]) == 0
    assert capsys.readouterr().out.startswith(f"24 embeddings (512-d) of {train} -> {out} (")
    assert load_embeddings(out).features.shape == (24, 512)
    assert main(["extract", model, train, str(out), *FAST]) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["knn", model, "--train", str(tmp_path / "empty"), "--val", train, *FAST]) == 2
    assert "no images found" in capsys.readouterr().err
    flat = make_image_folder(tmp_path / "flat", per_class=2, labelled=False)
    assert main(["knn", model, "--train", str(flat), "--val", train, *FAST]) == 2
    assert "no class sub-folders" in capsys.readouterr().err


def test_a_truncated_export_is_one_line_naming_the_file_and_the_way_out(setup, tmp_path, capsys):
    model, train, val = setup
    cut = mocohub.save_pretrained(mocohub.from_pretrained(model), tmp_path / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy that stopped early
    with pytest.raises(mocohub.MocohubError, match="model.safetensors is damaged"):
        mocohub.from_pretrained(str(cut))
    assert main(["knn", str(cut), "--train", train, "--val", val, *FAST]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"mocohub knn: error: {weights} is damaged") and f"mocohub convert CHECKPOINT {cut}" in line


def test_knn_refuses_k_zero_and_a_val_folder_without_classes(setup, tmp_path, capsys):
    model, train, _ = setup
    with pytest.raises(SystemExit) as usage:
        main(["knn", model, "--train", train, "--val", train, "--k", "0", *FAST])
    assert usage.value.code == 2 and "argument --k: must be above 0, got 0" in capsys.readouterr().err
    flat = make_image_folder(tmp_path / "flat", per_class=2, labelled=False)
    for command in ("knn", "eval"):
        assert main([command, model, "--train", train, "--val", str(flat), *FAST]) == 2
        assert capsys.readouterr().err == (f"mocohub {command}: error: --val {flat} has no class sub-folders: "
                                           "labels come from DIR/<class>/<image>\n")


def test_lincls_v3_on_fewer_images_than_its_batch_says_the_batch_it_uses(setup, tmp_path, capsys):
    model, train, val = setup
    out = tmp_path / "v3"
    assert main(["lincls", model, "--train", train, "--val", val, "--out", str(out), "--protocol", "v3",
                 "--epochs", "1", *FAST]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "the v3 protocol's batch of 1024 is more than the 24 training images: batch 24, lr 0.00938 " \
                    "(--batch-size sets it)"
    (logged,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged["lr"] == pytest.approx(0.1 * 24 / 256)  # v3's rule, lr = 0.1 x batch / 256, first epoch
