"""Training losses and frame-grid diagnostics of a `Reconstruction`, as plain functions.

The decoder's terms follow TRELLIS's mesh training: a truncated L1 on the vertex SDF, plus cell
occupancy (BCE and soft Dice) from the mean SDF of each cell's corners; stage 1 adds BCE and soft
Dice on its R^3 occupancy. Frame-grid Dice values are diagnostics only: scores are computed on each
scan's own grid (`lora_sam3d.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from lora_sam3d.inputs import Targets
from lora_sam3d.models.reconstructor import Reconstruction

__all__ = [
    "DIAGNOSTICS",
    "LossWeights",
    "frame_diagnostics",
    "hard_dice",
    "reconstruction_losses",
    "soft_dice_loss",
]

DIAGNOSTICS = (
    "loss",
    "sdf_l1",
    "occupancy_bce",
    "soft_dice",
    "structure_bce",
    "structure_dice",
    "active_voxels",
    "frame_coarse_dice",
    "frame_dice",
)
"""What validation and test log beside the scores: the loss terms and the frame-grid diagnostics."""


@dataclass(frozen=True)
class LossWeights:
    """The terms' weights and the SDF clamp (frame units) of `reconstruction_losses` (``model.loss``).

    Args:
        sdf, occupancy, dice: the decoder's truncated SDF L1, cell occupancy BCE and soft Dice.
        structure: stage 1's occupancy BCE + soft Dice on the R^3 cells.
        sdf_truncation: the SDF clamp of the L1 term, frame units.
    """

    sdf: float = 1.0
    occupancy: float = 1.0
    dice: float = 0.5
    structure: float = 1.0
    sdf_truncation: float = 0.1


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
    rec: Reconstruction, targets: Targets, w: LossWeights, n: int
) -> dict[str, torch.Tensor]:
    """Decoder terms (truncated SDF L1, cell occupancy BCE and soft Dice on the (4R)^3 cells, n = 4R)
    plus stage 1's occupancy BCE and soft Dice on the R^3 cells, weighted by ``w``."""
    if targets.sdf is None or targets.occupancy is None:
        raise ValueError(
            "reconstruction_losses needs a batch with 3D targets (a split's samples, not requests)"
        )
    tau = w.sdf_truncation
    sdf = rec.sdf
    gt = targets.sdf.to(sdf.dtype)
    sdf_l1 = (sdf.clamp(-tau, tau) - gt.clamp(-tau, tau)).abs().mean()
    logits = occupancy_logits(sdf, n)
    target = targets.occupancy.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    dice = soft_dice_loss(torch.sigmoid(logits), target)
    total = w.sdf * sdf_l1 + w.occupancy * bce + w.dice * dice
    terms = {"sdf_l1": sdf_l1, "occupancy_bce": bce, "soft_dice": dice}
    if rec.coarse_logits is not None and targets.coarse_occupancy is not None:
        coarse = targets.coarse_occupancy.to(rec.coarse_logits.dtype)
        s_bce = F.binary_cross_entropy_with_logits(rec.coarse_logits, coarse)
        s_dice = soft_dice_loss(torch.sigmoid(rec.coarse_logits), coarse)
        total = total + w.structure * (s_bce + s_dice)
        terms |= {"structure_bce": s_bce, "structure_dice": s_dice}
    return {"loss": total, **terms}


def frame_diagnostics(
    rec: Reconstruction, targets: Targets, w: LossWeights, n: int
) -> dict[str, torch.Tensor]:
    """The loss terms plus the active cells per sample and the frame-grid Dice of both stages."""
    values = reconstruction_losses(rec, targets, w, n)
    if rec.active is not None and rec.coarse_logits is not None and targets.coarse_occupancy is not None:
        values["active_voxels"] = rec.active.flatten(1).sum(1).float().mean()
        values["frame_coarse_dice"] = hard_dice(rec.coarse_logits > 0, targets.coarse_occupancy)
    values["frame_dice"] = hard_dice(occupancy_logits(rec.sdf, n) > 0, targets.occupancy)
    return values
