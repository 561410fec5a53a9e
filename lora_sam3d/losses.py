"""Training losses and frame-grid diagnostics of a `Reconstruction`, as plain functions.

The decoder's terms follow TRELLIS's mesh training: a truncated L1 on the vertex SDF, plus cell
occupancy (BCE and soft Dice) from the mean SDF of each cell's corners; stage 1 adds BCE and soft
Dice on its R^3 occupancy. Frame-grid Dice values are diagnostics only: scores are computed on each
scan's own grid (`lora_sam3d.metrics`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from lora_sam3d.models.reconstructor import Reconstruction

DIAGNOSTICS = (
    "loss", "sdf_l1", "occupancy_bce", "soft_dice", "structure_bce", "structure_dice",
    "active_voxels", "frame_coarse_dice", "frame_dice",
)  # fmt: skip
"""What validation and test log beside the scores: the loss terms and the frame-grid diagnostics."""


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - the batch mean of the smoothed (+1) soft Dice of (B, ...) probabilities and targets."""
    inter = (prob.flatten(1) * target.flatten(1)).sum(1)
    return 1 - ((2 * inter + 1) / (prob.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)).mean()


def hard_dice(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the Dice of two boolean grids (frame-grid training diagnostic)."""
    p, g = pred.flatten(1).float(), gt.flatten(1).float()
    return ((2 * (p * g).sum(1) + 1e-6) / (p.sum(1) + g.sum(1) + 1e-6)).mean()


def occupancy_logits(sdf: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n, n, n) logits of each cell being inside, from the mean SDF of its 8 corners, in voxel units."""
    cell = F.avg_pool3d(sdf[:, None], kernel_size=2, stride=1)[:, 0]
    return -cell * n


def reconstruction_losses(
    rec: Reconstruction, batch: dict[str, Any], h: Any, n: int
) -> dict[str, torch.Tensor]:
    """Decoder terms (truncated SDF L1, cell occupancy BCE and soft Dice on the (4R)^3 cells) plus stage 1's
    occupancy BCE and soft Dice on the R^3 cells. ``h`` holds ``sdf_truncation`` and the weights
    ``sdf_weight``, ``occupancy_weight``, ``dice_weight``, ``structure_weight`` (the module's hparams)."""
    tau = h.sdf_truncation
    sdf = rec.sdf
    gt = batch["gt_sdf"].to(sdf.dtype)
    sdf_l1 = (sdf.clamp(-tau, tau) - gt.clamp(-tau, tau)).abs().mean()
    logits = occupancy_logits(sdf, n)
    target = batch["gt_occupancy"].to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    dice = soft_dice_loss(torch.sigmoid(logits), target)
    total = h.sdf_weight * sdf_l1 + h.occupancy_weight * bce + h.dice_weight * dice
    terms = {"sdf_l1": sdf_l1, "occupancy_bce": bce, "soft_dice": dice}
    if rec.coarse_logits is not None:
        coarse = batch["gt_coarse_occupancy"].to(rec.coarse_logits.dtype)
        s_bce = F.binary_cross_entropy_with_logits(rec.coarse_logits, coarse)
        s_dice = soft_dice_loss(torch.sigmoid(rec.coarse_logits), coarse)
        total = total + h.structure_weight * (s_bce + s_dice)
        terms |= {"structure_bce": s_bce, "structure_dice": s_dice}
    return {"loss": total, **terms}


def frame_diagnostics(rec: Reconstruction, batch: dict[str, Any], h: Any, n: int) -> dict[str, torch.Tensor]:
    """The loss terms plus the active cells per sample and the frame-grid Dice of both stages."""
    values = reconstruction_losses(rec, batch, h, n)
    if rec.active is not None and rec.coarse_logits is not None:
        values["active_voxels"] = rec.active.flatten(1).sum(1).float().mean()
        values["frame_coarse_dice"] = hard_dice(rec.coarse_logits > 0, batch["gt_coarse_occupancy"])
    values["frame_dice"] = hard_dice(occupancy_logits(rec.sdf, n) > 0, batch["gt_occupancy"])
    return values
