"""Your own MoCo v2 training loop with mocohub's pieces (``mocohub train`` does all this for you).

    python examples/custom_training_loop.py --images photos/ --arch resnet18 --image-size 64 --steps 100 --save moco.pth.tar

``--save`` writes the official checkpoint layout: ``mocohub.from_pretrained("moco.pth.tar")`` loads
its backbone, and ``mocohub train --resume moco.pth.tar`` continues it.

The loop is the paper's: ``loss = F.cross_entropy(*model(im_q, im_k))``. The key encoder's
momentum update, Shuffle BN and the queue happen inside ``MoCo.forward``.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import mocohub
from mocohub.data.augment import TwoViews, augmentation
from mocohub.data.folder import ImageFolder, collate_images


def main(argv=None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--queue", type=int, default=4096, help="K: a multiple of the batch size")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.03 * 32 / 256, help="0.03 per 256 images (linear scaling)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--save", help="write the model and optimiser here (official MoCo checkpoint layout)")
    args = p.parse_args(argv)

    # aug+ of MoCo v2; each image gives two independently augmented views
    dataset = ImageFolder(args.images, TwoViews(augmentation("moco-v2", args.image_size)))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, collate_fn=collate_images)
    stem = "cifar" if args.image_size <= 64 else "imagenet"
    # MoCo v2: MLP head, T=0.2; SplitBatchNorm (4 groups) stands in for per-GPU BN on one device
    model = mocohub.MoCo(args.arch, dim=128, K=args.queue, m=0.999, T=0.2, mlp=True, stem=stem,
                         bn_splits=4 if args.batch_size % 4 == 0 else 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    losses = []
    while len(losses) < args.steps:
        for batch in loader:
            im_q, im_k = batch.images
            loss = F.cross_entropy(*model(im_q, im_k))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            print(f"step {len(losses)}: loss {losses[-1]:.4f}")
            if len(losses) == args.steps:
                break
    if args.save:
        torch.save({"epoch": 0, "arch": args.arch, "optimizer": optimizer.state_dict(),
                    "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, args.save)
    return losses


if __name__ == "__main__":
    main()
