"""MoCo learns: a small deterministic run on generated images, judged as a user would judge it."""
import json

import torch
from torch.utils.data import DataLoader

from mocohub import from_pretrained
from mocohub.backbones import create_resnet
from mocohub.data.augment import CIFAR_MEAN, CIFAR_STD
from mocohub.data.folder import ImageFolder, collate_images
from mocohub.data.synthetic import make_dataset
from mocohub.evaluation.knn import knn_evaluate
from mocohub.training import TrainConfig, train
from mocohub.zoo import transform_for
from mocohub.zoo.pretrained import pretrained_cfg_for


def _loader(model, folder):
    return DataLoader(ImageFolder(folder, transform_for(model)), batch_size=256, collate_fn=collate_images)


def knn_top1(model, train_dir, val_dir) -> float:
    return knn_evaluate(model.eval(), _loader(model, train_dir), _loader(model, val_dir))["top1"]


def random_init_knn_top1(train_dir, val_dir, arch="test_resnet", size=32) -> float:
    """kNN top-1 of a randomly initialised network (seed 0) given the training images' BN statistics,
    as a trained one has them: the fair baseline."""
    torch.manual_seed(0)
    model = create_resnet(arch, stem="cifar")
    model.pretrained_cfg = pretrained_cfg_for(size, CIFAR_MEAN, CIFAR_STD)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the pass
        model.train()
        for batch in _loader(model, train_dir):
            model(batch.images)
    return knn_top1(model, train_dir, val_dir)


SIZE = 24  # px, for the run and for its random-init baseline alike


def test_loss_falls_and_knn_rises_clearly_above_random_init(tmp_path):
    """1,000 shapes at 24 px, 250 steps of 32 (about 17 s): measured +19.2 kNN points over random init
    (64.4 against 45.2), loss 5.22 -> 4.84 (at 32 px: +8.8 in 25 s)."""
    train_dir, val_dir = make_dataset(tmp_path / "data", train_per_class=100, val_per_class=25)
    cfg = TrainConfig.from_recipe("cifar", data=str(train_dir), out=str(tmp_path / "run"), arch="test_resnet",
                                  image_size=SIZE, epochs=8, batch_size=32, lr=0.03, moco_k=512, mlp=True, moco_t=0.2,
                                  precision="fp32", workers=0, progress=False, val=str(val_dir), knn_every=4)
    scores = {"trained": knn_top1(from_pretrained(str(train(cfg))), train_dir, val_dir),
              "random": random_init_knn_top1(train_dir, val_dir, size=SIZE)}

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses, monitor = [r["loss"] for r in rows], [r["knn_top1"] for r in rows if "knn_top1" in r]
    assert len(losses) == 8 and min(losses[-2:]) < losses[0] - 0.15, losses
    assert len(monitor) == 2 and monitor[1] > monitor[0], monitor
    assert scores["trained"] >= scores["random"] + 10, scores
