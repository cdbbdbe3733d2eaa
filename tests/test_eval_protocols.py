"""mocohub eval: every protocol in one table, scored as knn and lincls score them, on one feature pass."""
import json
import re

import pytest
import torch

import mocohub
from eval_fixtures import make_image_folder, tiny_resnet
from mocohub.cli.main import main
from mocohub.data.shards import write_shards
from mocohub.evaluation.protocols import evaluate_protocols

FAST = ["--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    model_dir = mocohub.save_pretrained(tiny_resnet(), tmp / "model")
    train = make_image_folder(tmp / "train", num_classes=4, per_class=10, seed=1)
    val = make_image_folder(tmp / "val", num_classes=4, per_class=6, seed=2)
    for i in range(3):  # mislabelled val images: no protocol is perfect, so equal figures mean equal scoring
        (val / "class0" / f"c0_{i:03d}.png").rename(val / "class1" / f"moved_{i}.png")
    return str(model_dir), str(train), str(val)


def _json(capsys):
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return json.loads(line)


def _count_images(model):
    """Images the backbone embeds, counted by a forward hook."""
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(len(inputs[0])))
    return seen


def test_eval_rows_equal_knn_and_fast_lincls_figures(setup, tmp_path, capsys):
    model, train, val = setup
    args = [model, "--train", train, "--val", val, "--precision", "fp32", "--json", *FAST]
    assert main(["eval", *args, "--k", "5", "--fast-wd", "1e-4", "1e-2"]) == 0
    printed = _json(capsys)
    assert set(printed) == {"command", "model", "results", "precision", "seconds"} and printed["model"] == model
    knn_row, fast_row = printed["results"]
    assert [set(r) for r in printed["results"]] == [{"protocol", "top1", "top5", "seconds", "settings"}] * 2
    assert (knn_row["protocol"], fast_row["protocol"]) == ("knn", "fast")
    assert main(["knn", *args, "--k", "5"]) == 0
    knn = _json(capsys)
    assert (knn_row["top1"], knn_row["top5"]) == (knn["top1"], knn["top5"])
    assert knn_row["settings"]["k"] == 5 and knn_row["settings"]["t"] == 0.1
    assert main(["lincls", *args, "--fast", "--fast-wd", "1e-4", "1e-2", "--out", str(tmp_path / "clf")]) == 0
    fast = _json(capsys)
    assert (fast_row["top1"], fast_row["top5"]) == (fast["top1"], fast["top5"])
    assert fast_row["settings"]["weight_decay"] == fast["weight_decay"]
    assert fast_row["settings"]["weight_decays"] == [1e-4, 1e-2]
    assert knn_row["settings"]["features_s"] == fast_row["settings"]["features_s"] > 0
    assert knn["top1"] <= 87.5 and fast["top1"] <= 87.5  # 3 of 24 mislabelled


def test_features_are_computed_once_for_knn_and_the_fast_probe(setup):
    _, train, val = setup
    model = tiny_resnet()
    seen = _count_images(model)
    rows = evaluate_protocols(model, train, val, ("knn", "fast"), k=5, weight_decays=[1e-3], batch_size=16)
    assert sum(seen) == 40 + 24  # each train and val image embedded once, for both rows
    assert [r["protocol"] for r in rows] == ["knn", "fast"]
    assert rows[0]["settings"]["num_train"] == 40 and rows[1]["settings"]["num_val"] == 24


def test_official_protocols_add_one_row_each_with_their_settings(setup, capsys):
    model, train, val = setup
    assert main(["eval", model, "--train", train, "--val", val, "--official", "--protocol", "v1", "v3",
                 "--epochs", "2", "--k", "5", "--fast-wd", "1e-3", *FAST]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["protocol", "settings", "top-1", "top-5", "seconds"]
    assert [line.split()[0] for line in out[1:5]] == ["knn", "fast", "v1", "v3"]
    assert "k 5, t 0.1" in out[1] and "L-BFGS, wd 0.001" in out[2]
    # fewer images than the protocols' batches: one batch of all 40, v3's lr following it (0.1 x 40 / 256)
    assert "SGD 2 epochs, lr 30, batch 40, step x0.1 at 60, 80" in out[3]
    assert "SGD 2 epochs, lr 0.0156, batch 40, cosine" in out[4]
    assert all(re.search(r"\d+\.\d %\s+\d+\.\d %\s+[0-9.]+ (ms|s)$", line) for line in out[1:5]), out
    assert out[5].startswith("kNN and fast scored one feature pass of 40 train and 24 val images (")


def test_official_rows_embed_every_epoch_and_json_has_their_settings(setup):
    _, train, val = setup
    model = tiny_resnet()
    seen = _count_images(model)
    (row,) = evaluate_protocols(model, train, val, ["v1"], epochs=2, batch_size=64)
    assert row["protocol"] == "v1" and row["settings"]["epochs"] == 2 and row["settings"]["batch_size"] == 40
    assert sum(seen) == 2 * (40 + 24)  # two epochs of augmented train images, val scored after each
    assert row["seconds"] > 0 and 0 <= row["top1"] <= row["top5"] <= 100


def test_an_unknown_protocol_is_refused_naming_the_known_ones(setup):
    _, train, _ = setup
    with pytest.raises(mocohub.MocohubError, match="unknown evaluation protocol svm; choose from knn, fast, v1, v3"):
        evaluate_protocols(tiny_resnet(), train, train, ["svm"])


def test_knn_extract_and_eval_read_shards_as_their_folder(setup, tmp_path, capsys):
    model, train, val = setup
    shards = {name: write_shards(folder, tmp_path / "shards", shard_bytes=3000)["pattern"]
              for name, folder in (("train", train), ("val", val))}
    assert "{" in shards["train"]  # several shards, read through the brace pattern
    figures = []
    for source in ({"train": train, "val": val}, shards):
        assert main(["knn", model, "--train", source["train"], "--val", source["val"], "--k", "5",
                     "--precision", "fp32", "--json", *FAST]) == 0
        figures.append(_json(capsys))
    assert figures[0]["num_train"] == figures[1]["num_train"] == 40
    assert (figures[0]["top1"], figures[0]["top5"]) == (figures[1]["top1"], figures[1]["top5"])
    assert main(["eval", model, "--train", shards["train"], "--val", shards["val"], "--k", "5",
                 "--precision", "fp32", "--json", *FAST]) == 0
    assert _json(capsys)["results"][0]["top1"] == figures[0]["top1"]
    from_folder = mocohub.evaluation.extract.extract_embeddings(tiny_resnet(), val, tmp_path / "a.st")
    from_shards = mocohub.evaluation.extract.extract_embeddings(tiny_resnet(), shards["val"], tmp_path / "b.st")
    a, b = (mocohub.evaluation.load_embeddings(p) for p in (from_folder, from_shards))
    assert a.paths == b.paths and torch.equal(a.features, b.features) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("command", [["knn", "--k", "5"], ["lincls", "--fast", "--fast-wd", "1e-3"],
                                     ["eval", "--k", "5", "--fast-wd", "1e-3"]])
def test_device_cpu_scores_on_the_cpu_with_a_gpu_visible(setup, tmp_path, monkeypatch, command):
    """kNN and the probe default to a visible GPU; --device cpu must keep them off it (here a faked
    GPU that any use would fail on: this torch has no CUDA)."""
    model, train, val = setup
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    out = ["--out", str(tmp_path / "clf")] if command[0] == "lincls" else []
    assert main([command[0], model, "--train", train, "--val", val, *command[1:], "--device", "cpu", *out, *FAST]) == 0
