"""MoCo v3 backbones downstream: `mocohub extract`, `knn`, `lincls --protocol v3` and features_only on
files in the official v3 layout (what the zoo's v3 entries download; tiny here, no network) and on
a `mocohub train` v3 run's export."""
import json

import pytest
import torch

import mocohub
from eval_fixtures import make_image_folder
from mocohub.cli.main import main
from mocohub.evaluation.extract import load_embeddings
from mocohub.evaluation.linear import resolve_protocol
from mocohub.zoo.registry import get_model
from zoo_layouts import features, moco_v3_resnet, moco_v3_vit, official_v3_backbone

FAST = ["--workers", "0", "--quiet", "--precision", "fp32"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("images")
    return str(make_image_folder(tmp / "train", per_class=4, seed=1)), str(make_image_folder(tmp / "val", per_class=2,
                                                                                                seed=2))


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """main_moco.py checkpoints of a ResNet-18 and a ViT-S (the zoo's v3 entries' layout), with the
    official transfer rule's model of each."""
    tmp = tmp_path_factory.mktemp("official")
    resnet = moco_v3_resnet("resnet18")
    torch.save(resnet, tmp / "r18.pth.tar")
    vit, vit_reference = moco_v3_vit("vit_small")
    torch.save(vit, tmp / "vit-s.pth.tar")
    return {"resnet": (str(tmp / "r18.pth.tar"), official_v3_backbone(resnet, "resnet18")),
            "vit": (str(tmp / "vit-s.pth.tar"), vit_reference)}


@pytest.fixture(scope="module")
def our_run(tmp_path_factory):
    """A `mocohub train` MoCo v3 ViT, one step: its exported backbone folder."""
    tmp = tmp_path_factory.mktemp("run")
    train = make_image_folder(tmp / "data", per_class=4, size=16)
    assert main(["train", str(train), "--recipe", "moco-v3-vit", "--arch", "test_vit", "--image-size", "16",
                 "--patch-size", "4", "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1", "--mlp-dim", "32",
                 "--moco-dim", "16", "--max-steps", "1", "--workers", "0", "--no-progress", "--precision", "fp32",
                 "--out", str(tmp / "run")]) == 0
    return str(tmp / "run" / "backbone")


def test_official_v3_files_load_as_the_zoo_entries_describe_them(official):
    for (path, reference), entry, size in ((official["resnet"], None, 64), (official["vit"], "moco-v3-vit-s-300ep", 224)):
        model = mocohub.from_pretrained(path)
        torch.testing.assert_close(features(model, size), features(reference, size))
        if entry:  # the zoo's ViT-S entry builds the same timm model (12 heads)
            zoo = get_model(entry)
            assert (model.mocohub_config["architecture"], model.mocohub_config["model_args"]) == \
                (zoo.arch, dict(zoo.model_args))


@pytest.mark.parametrize("kind, channels", [("resnet", [64, 64, 128, 256, 512]), ("vit", [384] * 3)])
def test_features_only_on_v3_backbones(official, our_run, kind, channels):
    path, _ = official[kind]
    if kind == "vit":
        model = mocohub.from_pretrained(path, features_only=True, out_indices=(-3, -2, -1))
        maps = model(torch.randn(1, 3, 224, 224))
        assert [m.shape for m in maps] == [(1, 384, 14, 14)] * 3
        ours = mocohub.from_pretrained(our_run, features_only=True, out_indices=(-1,))
        (last,) = ours(torch.randn(1, 3, 16, 16))
        assert last.shape == (1, 64, 4, 4)  # our tiny ViT: 16 px in patches of 4
    else:
        model = mocohub.from_pretrained(path, features_only=True)
        maps = model(torch.randn(1, 3, 64, 64))
        assert [m.shape[1] for m in maps] == channels
        # the last level is the backbone's last block, before pooling: pooled, it is the pooled feature
        pooled = mocohub.from_pretrained(path)
        with torch.no_grad():
            x = torch.randn(1, 3, 64, 64)
            torch.testing.assert_close(model(x)[-1].mean((2, 3)), pooled(x))


@pytest.mark.parametrize("source", ["official-resnet", "ours"])
def test_extract_knn_and_v3_lincls(official, our_run, folders, tmp_path, capsys, source):
    model = official["resnet"][0] if source == "official-resnet" else our_run
    train, val = folders
    width = 512 if source == "official-resnet" else 64
    out = tmp_path / "emb.safetensors"
    assert main(["extract", model, train, str(out), *FAST]) == 0
    assert load_embeddings(out).features.shape == (12, width)
    capsys.readouterr()
    assert main(["knn", model, "--train", train, "--val", val, "--k", "3", "--json", *FAST]) == 0
    knn = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert knn["num_train"] == 12 and 0 <= knn["top1"] <= 100
    lin = tmp_path / "lin"
    assert main(["lincls", model, "--train", train, "--val", val, "--protocol", "v3", "--epochs", "2", "--batch-size",
                 "4", "--out", str(lin), *FAST]) == 0
    rows = [json.loads(line) for line in (lin / "metrics.jsonl").read_text().splitlines()]
    base = 3.0 if source == "ours" else 0.1  # a ViT takes MoCo v3's ViT linear protocol
    assert rows[0]["lr"] == pytest.approx(base * 4 / 256)  # cosine: epoch 0 at the full lr x batch / 256
    assert rows[-1]["mode"] == ("v3-vit" if source == "ours" else "v3")
    assert mocohub.from_pretrained(str(lin), num_classes=None).num_classes == 3


def test_v3_linear_protocols_are_main_lincls():
    resnet, vit = resolve_protocol("v3"), resolve_protocol("v3-vit")
    assert (resnet.epochs, resnet.batch_size, resnet.schedule, resnet.momentum, resnet.weight_decay) == \
        (90, 1024, "cosine", 0.9, 0.0)
    assert resnet.lr == pytest.approx(0.4) and vit.lr == pytest.approx(12.0)  # base 0.1 / 3, x 1024/256
    assert resolve_protocol("v3-vit", batch_size=512).lr == pytest.approx(6.0)
    assert resolve_protocol("v3-vit", batch_size=512, lr=1.0).lr == 1.0
