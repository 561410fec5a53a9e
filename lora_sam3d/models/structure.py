"""Stage 1 of the coarse-to-fine design: which cells of the decoder's R^3 grid the organ occupies.

SAM 3D Objects (after TRELLIS) first decides the sparse structure (a dense coarse latent decoded to
occupancy), then runs its structured latent and mesh decoder only on the occupied voxels near the
surface. Here a small dense 3D U-Net reads the parameter-free slice unprojection on the R^3 grid
and returns, per cell, an occupancy logit and the decoder's latent channels (learned, like SAM 3D's
SLat). The active set handed to the decoder is the band of cells within ``margin`` cells of the
predicted surface; vertices of the fine grid that no active cell reaches take their sign from the
predicted occupancy, so marching cubes closes the surface. Plain torch ``nn.Conv3d`` layers, so
LoRA adapts them (`lora_sam3d.lora.LoRAConv3d`) as PEFT adapts convolutions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lora_sam3d.sparse import SparseTensor

__all__ = ["STRUCTURE_PREFIX", "SparseStructureNet", "active_latent", "surface_band", "vertex_fill"]

STRUCTURE_PREFIX = "structure."
"""Stage-1 weights sit under this prefix in a base file beside the decoder's (Meta's files have none)."""


def _block(cin: int, cout: int, groups: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1),
        nn.GroupNorm(groups, cout),
        nn.SiLU(),
        nn.Conv3d(cout, cout, 3, padding=1),
        nn.GroupNorm(groups, cout),
        nn.SiLU(),
    )


class SparseStructureNet(nn.Module):
    """Dense 3D U-Net (three levels): (B, in, R, R, R) slice evidence -> occupancy logits and latents.

    Args:
        in_channels: channels of the slice unprojection (8).
        channels: width of the first level (then 2x, 2x).
        latent_channels: the decoder's latent channels (8 for SAM 3D).
        num_groups: group-norm groups.

    Returns from ``forward``: ``logits`` (B, R, R, R) and ``latent`` (B, latent_channels, R, R, R).
    R must be divisible by 4.
    """

    def __init__(
        self, in_channels: int = 8, channels: int = 24, latent_channels: int = 8, num_groups: int = 8
    ) -> None:
        super().__init__()
        c = channels
        self.config = {
            "in_channels": in_channels,
            "channels": channels,
            "latent_channels": latent_channels,
            "num_groups": num_groups,
        }
        self.enc0 = _block(in_channels, c, num_groups)
        self.enc1 = _block(c, 2 * c, num_groups, stride=2)
        self.enc2 = _block(2 * c, 2 * c, num_groups, stride=2)
        self.dec1 = _block(4 * c, 2 * c, num_groups)
        self.dec0 = _block(3 * c, c, num_groups)
        self.head = nn.Conv3d(c, 1 + latent_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 5 or x.shape[-1] % 4:
            raise ValueError(f"expected (B, C, R, R, R) with R divisible by 4, got {tuple(x.shape)}")
        h0 = self.enc0(x)
        h1 = self.enc1(h0)
        h2 = self.enc2(h1)
        up = F.interpolate(h2, scale_factor=2, mode="trilinear", align_corners=False)
        d1 = self.dec1(torch.cat([up, h1], 1))
        up = F.interpolate(d1, scale_factor=2, mode="trilinear", align_corners=False)
        d0 = self.dec0(torch.cat([up, h0], 1))
        out = self.head(d0)
        return out[:, 0], out[:, 1:]


def surface_band(occupancy: torch.Tensor, margin: int = 1) -> torch.Tensor:
    """(B, R, R, R) bool: cells within ``margin`` cells (Chebyshev) of both an inside and an outside cell.

    With margin >= 1 any two cells that share a fine-grid vertex and disagree are both in the band,
    so every vertex outside the band has one well-defined sign.
    """
    occ = occupancy.float()[:, None]
    k = 2 * margin + 1
    near_inside = F.max_pool3d(occ, k, stride=1, padding=margin) > 0
    near_outside = F.max_pool3d(1 - occ, k, stride=1, padding=margin) > 0
    return (near_inside & near_outside)[:, 0]


def active_latent(active: torch.Tensor, latent: torch.Tensor) -> SparseTensor:
    """The decoder's input: the latent channels (B, C, R, R, R) at the ``active`` (B, R, R, R) cells."""
    b, x, y, z = torch.nonzero(active, as_tuple=True)
    coords = torch.stack([b, x, y, z], dim=1).int()
    return SparseTensor(latent.permute(0, 2, 3, 4, 1)[b, x, y, z], coords, batch_size=active.shape[0])


def vertex_fill(occupancy: torch.Tensor, fine: int) -> torch.Tensor:
    """(B, fine+1, fine+1, fine+1) SDF values for vertices no active cell reaches: -1 inside, +1 outside.

    Vertex i of the fine grid lies in coarse cell ``min(i * R // fine, R - 1)``.
    """
    r = occupancy.shape[-1]
    idx = torch.clamp(torch.arange(fine + 1, device=occupancy.device) * r // fine, max=r - 1)
    occ = occupancy[:, idx][:, :, idx][:, :, :, idx]
    return torch.where(occ, -1.0, 1.0)
