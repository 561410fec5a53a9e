"""The user's drawing given back: the predicted surface meets each drawn slice's contour on its plane.

A user looks first at the slices they drew; a 3D result that disagrees there is wrong to them,
whatever its Dice. `keep_drawing` corrects the predicted SDF near each drawn view's plane by its
residual to the view's own signed distance: on the plane the mask is the user's (up to the grid's
resolution), and the correction fades over ``width`` grid cells on either side, so the surface
bends to the contour instead of being cut and pasted, and keeps the network's shape across the
plane. Where two drawn planes cross, their corrections are averaged by weight: the result follows
neither drawing blindly where they disagree. `drawn_dice` scores a prediction against the drawing on each drawn plane (no truth
needed). Written here: no library blends a 3D SDF with 2D distance maps on arbitrary planes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_sam3d.inputs import Evidence
from lora_sam3d.models.latent import PLANE_AXES

__all__ = ["DRAWING_WIDTH", "drawn_dice", "drawn_on_vertex_planes", "keep_drawing", "on_view_pixels"]

DRAWING_WIDTH = 1.0
"""How far (grid cells, a Gaussian's sigma) a drawn slice's contour reaches into the predicted SDF."""


def _vertex_coords(n: int, device: torch.device) -> torch.Tensor:
    """(n+1,) frame coordinates of the vertex grid's points along one axis."""
    return torch.arange(n + 1, device=device, dtype=torch.float32) / n - 0.5


def _drawn_on_grid(distance: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    """A view's (S, S) signed distance (its plane's two axes in order) sampled bilinearly at the vertex
    grid's in-plane points: (n+1, n+1), the first index along the plane's first axis."""
    u = _vertex_coords(n, distance.device) * 2  # frame [-0.5, 0.5] -> [-1, 1] over the pixels' extent
    gp, gq = torch.meshgrid(u, u, indexing="ij")
    grid = torch.stack([gq, gp], dim=-1)[None]  # grid_sample's x runs along the second axis
    out = F.grid_sample(
        distance[None, None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return out[0, 0]


def _broadcast(plane: torch.Tensor, along: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A plane's values (n+1, n+1) and a per-slice weight (n+1,) as (n+1,)^3 volumes, ``axis`` the normal."""
    shape = [1, 1, 1]
    shape[axis] = -1
    return plane.unsqueeze(axis), along.reshape(shape)


def _on_plane(sdf: torch.Tensor, axis: int, offset: float) -> torch.Tensor:
    """One sample's (n+1)^3 ``sdf`` read on the plane ``offset`` (frame units) normal to ``axis``:
    linear between the two vertex slices it lies between, (n+1, n+1) in the plane's axis order."""
    n = sdf.shape[-1] - 1
    pos = min(max((offset + 0.5) * n, 0.0), float(n))
    low = min(int(pos), n - 1)
    f = pos - low
    return (1 - f) * sdf.select(axis, low) + f * sdf.select(axis, low + 1)


def drawn_on_vertex_planes(evidence: Evidence, i: int, n: int) -> list[tuple[torch.Tensor, list[int], int]]:
    """Sample ``i``'s valid views on an (n+1)^3 vertex grid: per view, its drawn mask at the grid's
    in-plane points (n+1, n+1), the vertex slices its plane lies between, and its axis."""
    out = []
    for k in torch.nonzero(evidence.valid[i]).flatten().tolist():
        axis, offset = int(evidence.axis[i, k]), float(evidence.offset[i, k])
        pos = min(max((offset + 0.5) * n, 0.0), float(n))
        low = min(int(pos), n - 1)
        out.append((_drawn_on_grid(evidence.distance[i, k], axis, n) < 0, [low, low + 1], axis))
    return out


def keep_drawing(sdf: torch.Tensor, evidence: Evidence, width: float = 1.0) -> torch.Tensor:
    """(B, n+1, n+1, n+1) ``sdf`` bent to each valid view's drawing near its plane.

    On the plane the prediction is corrected by its residual to the drawn distance: in full where
    the two disagree in sign or lie within a grid cell of the contour, and only up to a cell's
    distance where both agree (deep inside or far outside the drawing a 2D distance says nothing of
    the third dimension), so the mask on the plane is the drawing's. The correction is applied in
    full on the vertex slices within one grid cell of the plane and fades as exp(-e^2 / 2 sigma^2)
    at e cells beyond them, sigma = ``width`` grid cells (cut at 3 sigma): the network's own shape
    across the plane is kept (a stack's caps, a thin wall) and only its offset from the drawing is
    removed. Crossing views' corrections are averaged by weight."""
    if width <= 0:
        return sdf
    b, n = sdf.shape[0], sdf.shape[-1] - 1
    sigma, cell = width / n, 1.0 / n
    u = _vertex_coords(n, sdf.device)
    out = sdf.clone()
    for i in range(b):
        total = torch.zeros_like(sdf[i])
        correction = torch.zeros_like(sdf[i])
        for k in torch.nonzero(evidence.valid[i]).flatten().tolist():
            axis, offset = int(evidence.axis[i, k]), float(evidence.offset[i, k])
            beyond = ((u - offset).abs() - cell).clamp_min(0)
            weight = torch.exp(-0.5 * (beyond / sigma) ** 2) * (beyond <= 3 * sigma)
            if not weight.any():
                continue  # the plane lies outside the frame's vertex grid
            drawn = _drawn_on_grid(evidence.distance[i, k], axis, n).to(sdf.dtype)
            net = _on_plane(sdf[i], axis, offset)
            near = (drawn.sign() != net.sign()) | (drawn.abs() < cell) | (net.abs() < cell)
            residual = torch.where(near, drawn - net, drawn.clamp(-cell, cell) - net.clamp(-cell, cell))
            plane, w = _broadcast(residual, weight, axis)
            total = total + w
            correction = correction + w * plane
        out[i] = sdf[i] + correction / total.clamp_min(1.0)
    return out


def on_view_pixels(sdf: torch.Tensor, axis: int, offset: float, size: int) -> torch.Tensor:
    """One sample's (n+1)^3 ``sdf`` read trilinearly at the pixel centres of a (size, size) view on the
    plane ``offset`` (frame units) normal to ``axis``: (size, size), differentiable."""
    c = ((torch.arange(size, device=sdf.device, dtype=torch.float32) + 0.5) / size - 0.5) * 2
    gp, gq = torch.meshgrid(c, c, indexing="ij")
    p, q = PLANE_AXES[axis].tolist()
    coords = torch.full((size, size, 3), 2 * float(offset), device=sdf.device)
    coords[..., p], coords[..., q] = gp, gq  # frame coordinates x 2: the vertex grid's [-1, 1]
    grid = coords[..., [2, 1, 0]][None, None]  # grid_sample's x is the volume's last axis
    return F.grid_sample(sdf[None, None].float(), grid, mode="bilinear", align_corners=True)[0, 0, 0]


def drawn_dice(sdf: torch.Tensor, evidence: Evidence) -> list[float]:
    """Per sample, the Dice between the predicted mask on each drawn plane and the drawn mask there,
    pooled over the sample's valid views (the predicted SDF read trilinearly at the view's pixel
    centres). What the user sees first, and needs no truth. An empty prediction scores 0."""
    size = evidence.mask.shape[-1]
    out = []
    for i in range(sdf.shape[0]):
        inter = total = 0.0
        for k in torch.nonzero(evidence.valid[i]).flatten().tolist():
            value = on_view_pixels(sdf[i], int(evidence.axis[i, k]), float(evidence.offset[i, k]), size)
            pred, mask = value < 0, evidence.mask[i, k].to(sdf.device)
            inter += float((pred & mask).sum())
            total += float(pred.sum() + mask.sum())
        empty = not bool((sdf[i] < 0).any())  # nothing predicted agrees with no drawing
        out.append(0.0 if empty else (2 * inter / total if total else 1.0))
    return out
