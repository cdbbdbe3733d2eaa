"""A torchvision Faster R-CNN on a MoCo backbone: a few training steps on one synthetic batch.

    python examples/faster_rcnn.py --model moco-r50

The defaults follow the MoCo paper's transfer setting: SyncBN in the backbone (it synchronises
under torch.distributed on GPUs and is plain BN elsewhere) and nothing frozen. For real
training, feed your dataset's images and targets instead of the synthetic ones and run under
torchrun for SyncBN to see the global batch.
"""
from __future__ import annotations

import argparse

import torch
from torchvision.models.detection import FasterRCNN

from mocohub.detection import NORMS, detection_backbone


def synthetic_batch(n: int, size: int, num_classes: int) -> tuple[list, list]:
    """Random images, each with one random box of a random class."""
    images = [torch.rand(3, size, size) for _ in range(n)]
    targets = []
    for _ in range(n):
        x0, y0 = torch.randint(0, size // 2, (2,)).tolist()
        w, h = torch.randint(size // 8, size // 2, (2,)).tolist()
        targets.append({"boxes": torch.tensor([[x0, y0, x0 + w, y0 + h]], dtype=torch.float32),
                        "labels": torch.randint(1, num_classes, (1,))})
    return images, targets


def main(argv=None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="moco-r50", help="anything mocohub.from_pretrained accepts (a ResNet)")
    p.add_argument("--norm", default="sync_bn", choices=NORMS)
    p.add_argument("--trainable-layers", type=int, default=5)
    p.add_argument("--num-classes", type=int, default=21, help="including background (VOC: 21)")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=1, help="steps on the same batch (the loss should fall)")
    args = p.parse_args(argv)

    backbone = detection_backbone(args.model, norm=args.norm, trainable_layers=args.trainable_layers)
    detector = FasterRCNN(backbone, num_classes=args.num_classes,
                          min_size=args.image_size, max_size=args.image_size).train()
    optimizer = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    images, targets = synthetic_batch(args.batch_size, args.image_size, args.num_classes)
    history = []
    for step in range(args.steps):
        losses = detector(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({k: round(v.item(), 4) for k, v in losses.items()})
        print(f"step {step + 1}: {history[-1]}")
    return history

if __name__ == "__main__":
    main()
