"""Linear probes: the official schedule, the fast L-BFGS probe, and the saved backbone+head."""
import pytest
import torch
from torch.utils.data import DataLoader

from eval_fixtures import make_image_folder, tiny_resnet
from mocohub.data.folder import ImageFolder, collate_images
from mocohub.errors import MocohubError
from mocohub.evaluation.classifier import save_classifier
from mocohub.evaluation.embeddings import Embeddings, compute_embeddings
from mocohub.evaluation.linear import (
    fast_linear_probe, fit_linear_head, lr_at_epoch, new_linear_head, resolve_protocol, train_linear_head,
)
from mocohub.evaluation.transforms import linear_cfg, train_transform
from mocohub.zoo.transforms import transform_for
from mocohub.zoo.pretrained import load_pretrained_dir


def test_official_schedules():
    v1 = resolve_protocol("v1")
    assert (v1.epochs, v1.lr, v1.batch_size, v1.momentum, v1.weight_decay) == (100, 30.0, 256, 0.9, 0.0)
    assert [lr_at_epoch(v1, e) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([30, 30, 3, 3, 0.3, 0.3])
    v3 = resolve_protocol("v3", batch_size=256)
    assert (v3.epochs, v3.lr, v3.schedule) == (90, pytest.approx(0.1), "cosine")
    assert lr_at_epoch(v3, 45) == pytest.approx(0.05) and lr_at_epoch(v3, 0) == pytest.approx(0.1)
    assert resolve_protocol("v1", epochs=3, lr=1.0).epochs == 3
    with pytest.raises(MocohubError, match="unknown linear protocol"):
        resolve_protocol("v9")


def test_new_head_init():
    torch.manual_seed(0)
    head = new_linear_head(2048, 1000)
    assert head.bias.abs().max() == 0 and abs(head.weight.std().item() - 0.01) < 1e-4


def test_lbfgs_head_applies_to_raw_features():
    torch.manual_seed(0)
    centres = torch.randn(3, 8) * 4
    labels = torch.arange(3).repeat_interleave(20)
    feats = (centres[labels] + torch.randn(60, 8)) * 50 + 1000  # far from standardised
    head = fit_linear_head(feats, labels, 3, weight_decay=1e-3)
    assert (head(feats).argmax(1) == labels).all()


def _loader(root, tf, batch_size=8, shuffle=False):
    return DataLoader(ImageFolder(root, tf, on_error="skip"), batch_size=batch_size, shuffle=shuffle,
                      collate_fn=collate_images)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lin")
    return make_image_folder(tmp / "train", per_class=8, seed=1), make_image_folder(tmp / "val", per_class=4, seed=2)


def test_fast_probe_and_saved_classifier_round_trip(folders, tmp_path):
    model = tiny_resnet()
    tf = transform_for(linear_cfg(model))
    train = compute_embeddings(model, _loader(folders[0], tf), normalize=False)
    val = compute_embeddings(model, _loader(folders[1], tf), normalize=False)
    head, metrics = fast_linear_probe(train, val, 3)
    assert metrics["top1"] == 100.0 and set(metrics["holdout_top1"]) == {"1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"}
    out = save_classifier(model, head, tmp_path / "clf", classes=["class0", "class1", "class2"], metrics=metrics)
    full = load_pretrained_dir(out)  # strict load: backbone + fc
    assert full.num_classes == 3 and full.mocohub_config["mocohub"]["classes"][2] == "class2"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(full(x), head(model(x)), atol=1e-5)


def test_fast_probe_holds_out_whole_images(monkeypatch):
    """Both augmented copies of an image fall on the same side of the weight-decay hold-out."""
    from mocohub.evaluation import linear

    images = torch.arange(20).repeat(2)  # rows i and i + 20 are two copies of image i
    feats = torch.cat([images[:, None].float(), torch.randn(40, 3)], 1)  # column 0 names the image
    fitted, scored, fit = [], [], linear.fit_linear_head

    def recording_fit(features, labels, num_classes, **kwargs):
        fitted.append(features[:, 0].long().tolist())
        head = fit(features, labels, num_classes, **kwargs)
        return lambda x: scored.append(x[:, 0].long().tolist()) or head(x)

    monkeypatch.setattr(linear, "fit_linear_head", recording_fit)
    train = Embeddings(feats, torch.arange(2).repeat(20), images, [])
    _, metrics = fast_linear_probe(train, train, 2, weight_decays=(1e-4, 1e-2), holdout=0.25, max_iter=5)
    assert len(fitted) == 3 and fitted[-1] == images.tolist()  # two searches, then the refit on all rows
    for fit_rows, held_rows in zip(fitted[:2], scored[:2]):
        assert len(held_rows) == 10 and sorted(held_rows) == sorted(2 * sorted(set(held_rows)))  # 5 whole images
        assert sorted(fit_rows + held_rows) == sorted(images.tolist()) and not set(fit_rows) & set(held_rows)
    assert scored[0] == scored[1] and metrics["num_train"] == 40
    with pytest.raises(MocohubError, match="no labels"):
        fast_linear_probe(train._replace(labels=torch.full((40,), -1)), train, 2)


def test_official_protocol_trains_only_the_head(folders):
    model = tiny_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = linear_cfg(model)
    assert len(next(iter(_loader(folders[0], train_transform(cfg)))).images) == 8  # RRC+flip runs
    epochs = []
    torch.manual_seed(0)  # random features of norm ~30: a small lr, and no augmentation to converge fast
    head, metrics = train_linear_head(
        model, _loader(folders[0], transform_for(cfg), shuffle=True), _loader(folders[1], transform_for(cfg)), 3,
        resolve_protocol("v1", epochs=6, lr=0.003, milestones=(4,)), on_epoch=epochs.append)
    assert [m["epoch"] for m in epochs] == [1, 2, 3, 4, 5, 6] and epochs[4]["lr"] == pytest.approx(0.0003)
    assert metrics["top1"] == 100.0 and metrics["loss"] < epochs[0]["loss"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats too
    assert head.weight.shape == (3, 512)


def test_transforms_follow_the_model_config_and_overrides():
    from PIL import Image

    model = tiny_resnet()  # a 16-px model
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    assert transform_for(linear_cfg(model))(image).shape == (3, 16, 16)
    assert train_transform(linear_cfg(model))(image).shape == (3, 16, 16)
    bigger = linear_cfg(model, input_size=24, crop_pct=0.5)
    assert transform_for(bigger)(image).shape == (3, 24, 24) and train_transform(bigger)(image).shape == (3, 24, 24)
    assert model.pretrained_cfg["input_size"] == [3, 16, 16]  # not modified
