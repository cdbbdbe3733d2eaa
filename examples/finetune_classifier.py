"""Fine-tune a MoCo backbone (all layers) as a classifier on a folder DIR/<class>/<image>.

    python examples/finetune_classifier.py --model moco-r50 --train data/train --val data/val --out my-classifier

The result is a mocohub export folder: ``mocohub.from_pretrained("my-classifier", num_classes=None)``.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import mocohub
from mocohub.data.folder import ImageFolder, collate_images
from mocohub.evaluation.transforms import linear_cfg, train_transform


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="moco-r50", help="anything mocohub.from_pretrained accepts")
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--out", required=True, help="export folder for the fine-tuned classifier")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)

    cfg = linear_cfg(mocohub.from_pretrained(args.model))
    train = ImageFolder(args.train, train_transform(cfg), on_error="skip")
    val = ImageFolder(args.val, mocohub.transform_for(cfg), on_error="skip")
    model = mocohub.from_pretrained(args.model, num_classes=len(train.classes))  # new fc, MoCo body
    model.mocohub_config["mocohub"]["classes"] = train.classes
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    loader = DataLoader(train, args.batch_size, shuffle=True, num_workers=args.workers, collate_fn=collate_images)
    for epoch in range(args.epochs):
        model.train()
        for batch in loader:
            if batch.images is None:
                continue
            loss = F.cross_entropy(model(batch.images), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for batch in DataLoader(val, args.batch_size, num_workers=args.workers, collate_fn=collate_images):
                if batch.images is not None:
                    correct += (model(batch.images).argmax(1) == batch.labels).sum().item()
                    total += len(batch.labels)
        result = {"epoch": epoch + 1, "loss": loss.item(), "val_top1": 100.0 * correct / max(total, 1)}
        print(result)
    mocohub.save_pretrained(model, args.out)
    print(f"saved to {args.out}")
    return result


if __name__ == "__main__":
    main()
