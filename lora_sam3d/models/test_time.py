"""Test-time LoRA on a request's own slices: before reconstructing from several drawn slices, a few
optimiser steps of the adapter on this scan, each slice predicted from the others.

With K >= 2 drawn slices, step t hides slice ``t mod K`` (leave one out): the model reads the other
slices and the scan, and the loss compares its surface on the hidden plane with the drawing there
(the signed distances, clamped to a few cells: the border matters, not the depth). Only the LoRA
factors move; they are restored after the request, so one model serves every request. With one
slice there is nothing to hold out and nothing is done. The hidden slice's drawing still shapes
the relative reading's tissue statistics (the scan's intensities under every mask): a small leak
of what the drawing marks, not of where. Written here: no library fine-tunes on a request's planes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch

from lora_sam3d.inputs import Evidence
from lora_sam3d.lora.inject import is_lora_name
from lora_sam3d.models.drawing import on_view_pixels

__all__ = ["CLAMP_CELLS", "adapted", "held_out_loss"]

CLAMP_CELLS = 3.0
"""Signed distances beyond this many grid cells from the drawn border count as that far."""


def held_out_loss(sdf: torch.Tensor, evidence: Evidence, k: int) -> torch.Tensor:
    """The predicted surface of sample 0 against its view ``k``'s drawing on that plane: mean absolute
    difference of the clamped signed distances (frame units) at the view's pixels."""
    n = sdf.shape[-1] - 1
    size = evidence.mask.shape[-1]
    pred = on_view_pixels(sdf[0], int(evidence.axis[0, k]), float(evidence.offset[0, k]), size)
    limit = CLAMP_CELLS / n
    want = evidence.distance[0, k].to(pred.device).float()
    return (pred.clamp(-limit, limit) - want.clamp(-limit, limit)).abs().mean() / limit


def _without(evidence: Evidence, k: int) -> Evidence:
    valid = evidence.valid.clone()
    valid[0, k] = False
    return replace(evidence, valid=valid)


@contextmanager
def adapted(
    network: torch.nn.Module, evidence: Evidence, steps: int, lr: float = 2e-3
) -> Iterator[list[float]]:
    """Inside the block, ``network`` is adapted to one request (``evidence`` of batch size 1) by
    ``steps`` leave-one-out steps on its LoRA factors (AdamW at ``lr``); the losses are yielded.
    The factors and the train/eval mode are restored on exit."""
    views = torch.nonzero(evidence.valid[0]).flatten().tolist()
    params = [p for name, p in network.named_parameters() if is_lora_name(name)]
    if steps <= 0 or len(views) < 2 or not params:
        yield []
        return
    saved = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    was_training = network.training
    losses: list[float] = []
    try:
        for p in params:
            p.requires_grad_(True)
        optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        network.eval()
        with torch.enable_grad():
            for step in range(steps):
                k = views[step % len(views)]
                rec = network(_without(evidence, k))
                loss = held_out_loss(rec.sdf, evidence, k)
                losses.append(float(loss))
                if not loss.requires_grad:  # the plane lies off the decoder's band: nothing to move
                    continue
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        yield losses
    finally:
        with torch.no_grad():
            for p, value, flag in zip(params, saved, flags, strict=True):
                p.copy_(value)
                p.requires_grad_(flag)
        network.train(was_training)
