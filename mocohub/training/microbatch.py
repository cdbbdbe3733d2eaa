"""A step over a process's batch in chunks of ``--micro-batch`` images, to the whole batch's gradient.

Activation memory then follows the chunk, not the batch: the paper's batch of 4096 on a few GPUs.

v1/v2: each sample's loss depends on its key and the queue, not on the rest of its batch, so the
chunks' gradients add up to the batch's (each chunk's loss weighted by chunk / batch), against the
queue as it was at the start of the step; the momentum update happens once before the first chunk
and the whole step's keys are enqueued once at the end.

v3: the other view's keys of the batch are the negatives, so accumulation would change the loss.
Representation-gradient caching (GradCache; Gao et al. 2021): the backbone features of every chunk
without gradient, the projector, predictor and loss over the whole batch (its BatchNorm1d layers
normalise the whole batch, as without chunks) with gradient down to the features, then each chunk's
backbone forwarded again with gradient and back-propagated with its slice. A layer-norm backbone
(ViT) gets exactly the batch's gradient, for one extra backbone forward per step.

BatchNorm backbones normalise per chunk (v1/v2: in ``bn_splits`` groups within each chunk), as each
GPU does without SyncBN. Chunk c holds samples c, c + C, c + 2C, ... (C chunks), so SplitBatchNorm's
groups (sample n in group n % splits) of a chunk with splits s are the groups of the whole batch
with C x s splits: the same grouping, chunked or not.

Gradients are averaged over processes once per step (``average_gradients``), not per chunk: the
model is called directly, past DDP's wrapper, whose hooks then stay idle.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..algorithm import MoCo, MoCoV3
from ..algorithm.distributed import world_size

__all__ = ["micro_step", "split", "merge", "average_gradients"]

Backward = Callable[[torch.Tensor], None]  # the (scaled) backward of a loss


def split(x: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """``parts`` chunks of the batch, chunk c holding samples c, c + parts, ... (see the module note)."""
    return [x[c::parts] for c in range(parts)]


def merge(chunks: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of ``split``: the batch in its own order."""
    return torch.stack(chunks, dim=1).flatten(0, 1)


def average_gradients(params: list[torch.Tensor]) -> None:
    """Average the gradients over the processes in one all-reduce, as DDP's backward would."""
    world = world_size()
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat.div_(world)
    torch._foreach_copy_(grads, _unflatten_dense_tensors(flat, grads))


def _moco_step(model: MoCo, im_q: torch.Tensor, im_k: torch.Tensor, m: float, parts: int,
               backward: Backward, autocast: Callable[[], AbstractContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo v1/v2's forward (``MoCo.forward``) chunk by chunk, with each chunk's backward."""
    model._momentum_update_key_encoder(m)
    loss, correct, rows, keys, keys_21 = 0.0, 0, 0, [], []
    for q, k in zip(split(im_q, parts), split(im_k, parts)):
        with autocast():
            logits, key = model._contrast(q, k)  # against the queue as it was at the start of the step
            labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
            chunk_loss = F.cross_entropy(logits, labels)
            keys.append(key)
            if model.symmetric:
                logits_21, key_1 = model._contrast(k, q)
                chunk_loss = chunk_loss + F.cross_entropy(logits_21, labels)
                keys_21.append(key_1)
                logits = torch.cat([logits, logits_21])
        backward(chunk_loss / parts)  # chunk / batch: the chunks' gradients add up to the batch mean's
        loss = loss + chunk_loss.detach() / parts
        correct = correct + (logits.detach().argmax(dim=1) == 0).sum()
        rows += logits.shape[0]
    model._dequeue_and_enqueue(torch.cat([merge(keys_21), merge(keys)]) if model.symmetric else merge(keys))
    return loss, correct / rows


def _rng_state(device: torch.device) -> tuple[torch.Tensor, ...]:
    return (torch.get_rng_state(),) + ((torch.cuda.get_rng_state(device),) if device.type == "cuda" else ())


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, ...]) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def _v3_step(model: MoCoV3, x1: torch.Tensor, x2: torch.Tensor, m: float, parts: int,
             backward: Backward, autocast: Callable[[], AbstractContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo v3's forward (``MoCoV3.forward``) with the backbones in chunks (GradCache)."""
    base, key_encoder, views = model.base_encoder, model.momentum_encoder, (split(x1, parts), split(x2, parts))
    with torch.no_grad(), autocast():
        model._update_momentum_encoder(m)
        k1, k2 = (model.project(key_encoder, merge([model.features(key_encoder, c) for c in chunks]))
                  for chunks in views)
        # the first pass of the base backbone: its BN buffers are put back after it and its random
        # draws replayed in the second, so that pass is the one that counts, once per chunk
        buffers = list(base.buffers())
        saved = [b.clone() for b in buffers]
        rng, features = [], []
        for chunks in views:
            outs = []
            for chunk in chunks:
                rng.append(_rng_state(chunk.device))
                outs.append(model.features(base, chunk))
            features.append(merge(outs).requires_grad_())
        if buffers:
            torch._foreach_copy_(buffers, saved)
    with autocast():  # the heads and the loss over the whole batch, as MoCoV3.forward
        q1, q2 = (model.predictor(model.project(base, f)) for f in features)
        loss_12, logits_12, labels = model.contrastive_loss(q1, k2)
        loss_21, logits_21, _ = model.contrastive_loss(q2, k1)
        loss = loss_12 + loss_21
    backward(loss)  # the heads' gradients, and the loss's gradient with respect to the features
    states = iter(rng)
    for f, chunks in zip(features, views):
        for chunk, grad in zip(chunks, split(f.grad, parts)):
            _set_rng_state(chunk.device, next(states))
            with autocast():
                out = model.features(base, chunk)
            out.backward(grad)  # the GradScaler's scale is already in the cached gradient
    logits = torch.cat([logits_12, logits_21]).detach()
    return loss.detach(), (logits.argmax(dim=1) == torch.cat([labels, labels])).float().mean()


def micro_step(model: MoCo | MoCoV3, x1: torch.Tensor, x2: torch.Tensor, m: float, micro_batch: int, *,
               backward: Backward, autocast: Callable[[], AbstractContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one step in chunks of ``micro_batch`` images, the gradients averaged
    over the processes; ``loss, acc`` of the step. ``backward`` back-propagates a loss (scaled by
    the GradScaler), ``autocast`` opens the run's autocast. The optimiser step is the caller's."""
    parts = x1.shape[0] // micro_batch
    step = _v3_step if isinstance(model, MoCoV3) else _moco_step
    loss, acc = step(model, x1, x2, m, parts, backward, autocast)
    average_gradients([p for p in model.parameters() if p.requires_grad])
    return loss, acc
