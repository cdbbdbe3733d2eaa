"""The kNN monitor, sharded over every training process.

Each rank embeds its share of the bank and of the queries, the bank shares are gathered on its
device, and each rank scores its queries against the whole bank there (a GPU, not one CPU thread
per rank); only the hit counts are summed. Nobody waits on
an idle collective while one rank works through an ImageNet-sized bank, so the job never hits
the collective timeout, and N processes finish about N times sooner.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..evaluation.embeddings import compute_embeddings
from ..evaluation.knn import knn_predict
from .runtime import Runtime

__all__ = ["sharded_knn"]


def _gather_rows(rt: Runtime, rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows concatenated on this rank's device (shares may differ by one row: pad,
    gather, trim)."""
    if rt.world == 1:
        return rows.to(rt.device)
    sizes = [torch.zeros(1, dtype=torch.long, device=rt.device) for _ in range(rt.world)]
    dist.all_gather(sizes, torch.tensor([rows.shape[0]], device=rt.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, *rows.shape[1:], dtype=rows.dtype, device=rt.device)
    padded[:rows.shape[0]] = rows.to(rt.device)
    parts = [torch.empty_like(padded) for _ in range(rt.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])


def _embed_share(rt: Runtime, model: nn.Module, dataset: Dataset, make_loader: Callable[[Dataset], DataLoader],
                 dim: int, **opts) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's embeddings and labels (every world-th image)."""
    share = Subset(dataset, range(rt.rank, len(dataset), rt.world))
    if len(share) == 0:
        return torch.zeros(0, dim), torch.zeros(0, dtype=torch.long)
    emb = compute_embeddings(model, make_loader(share), **opts)
    return emb.features, emb.labels


def sharded_knn(rt: Runtime, model: nn.Module, bank: Dataset, queries: Dataset,
                make_loader: Callable[[Dataset], DataLoader], num_classes: int, *, dim: int, k: int, t: float,
                precision: str, channels_last: bool) -> dict[str, float]:
    """Weighted kNN top-1/top-5 (percent) of ``queries`` against ``bank``, computed by all ranks."""
    opts = dict(device=rt.device, precision=precision, channels_last=channels_last)
    bank_x, bank_y = _embed_share(rt, model, bank, make_loader, dim, **opts)
    bank_x, bank_y = _gather_rows(rt, bank_x), _gather_rows(rt, bank_y)
    query_x, query_y = _embed_share(rt, model, queries, make_loader, dim, **opts)
    hits = torch.tensor([0.0, 0.0, len(query_y)], dtype=torch.float64, device=rt.device)  # top-1, top-5, n
    if query_x.shape[0]:  # scored on the training device, in chunks sized to its free memory
        scores = knn_predict(query_x, bank_x, bank_y, num_classes, k=k, t=t)
        top = scores.topk(min(5, num_classes), dim=1).indices == query_y.to(rt.device).view(-1, 1)
        hits[0], hits[1] = top[:, 0].sum(), top.any(dim=1).sum()
    if rt.world > 1:
        dist.all_reduce(hits)
    top1, top5, n = hits.tolist()
    return {"knn_top1": 100.0 * top1 / max(n, 1), "knn_top5": 100.0 * top5 / max(n, 1)}
