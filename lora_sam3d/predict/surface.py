"""The predicted surface made into what a user may take as the structure: what the drawing holds,
inside the scan that was drawn on.

Two steps on a sample's vertex SDF grid (frame units, < 0 inside), before its mesh, mask and
scores are made from it, so all three agree:

- `keep_drawn_pieces`: a piece of the prediction that touches none of the drawn masks (a blob past
  the structure's end) is removed; the count is kept for the outputs.
- `cut_at_scan`: the surface is cut at the scan's field of view (the box of its voxels) and closed
  there, as the mask on the scan's grid is. The uncut surface guesses tissue nobody imaged; how far
  it reached past the scan is kept (`beyond_scan_mm`).

scipy's connected-component labelling does the first; the second is the intersection of two signed
distances (``max``), written here since no library cuts an SDF grid by an oblique voxel box.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from lora_sam3d.geometry import frame_vertices_on
from lora_sam3d.inputs import Evidence
from lora_sam3d.models.drawing import drawn_on_vertex_planes

__all__ = ["beyond_scan_mm", "cut_at_scan", "keep_drawn_pieces", "scan_box_sdf"]


def keep_drawn_pieces(sdf: torch.Tensor, evidence: Evidence) -> tuple[torch.Tensor, list[int]]:
    """``sdf`` (B, n+1, n+1, n+1) with, per sample, every connected piece of its inside that touches
    no drawn mask on the vertex slices beside a drawn plane made outside; and the number of pieces
    removed per sample. A sample none of whose pieces touches its drawing is left whole (nothing
    there says which piece is meant)."""
    out, removed = sdf.clone(), []
    for i in range(sdf.shape[0]):
        inside = (sdf[i] < 0).cpu().numpy()
        labels, count = ndimage.label(inside, structure=np.ones((3, 3, 3)))
        if count < 2:
            removed.append(0)
            continue
        touched = set()
        for drawn, slices, axis in drawn_on_vertex_planes(evidence, i, sdf.shape[-1] - 1):
            for j in slices:
                plane = np.take(labels, j, axis=axis)
                touched |= set(np.unique(plane[drawn.cpu().numpy()]).tolist())
        touched.discard(0)
        if not touched:
            removed.append(0)
            continue
        drop = ~np.isin(labels, sorted(touched)) & inside
        values = out[i]
        mask = torch.from_numpy(drop).to(values.device)
        values[mask] = values[mask].abs().clamp_min(1e-4)
        removed.append(count - len(touched))
    return out, removed


def scan_box_sdf(
    n: int, frame_to_world: np.ndarray, affine: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """(n+1,)^3 signed distance, frame units, from each vertex of a frame's grid to the scan's field
    of view: the box of its voxels (``affine``, ``shape``; each voxel reaching half a voxel beyond its
    centre), < 0 inside. Per axis the distance to the box's faces in mm; their largest is exact inside
    and near the faces, which is where the cut surface lies."""
    vox = frame_vertices_on(n, frame_to_world, affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    size = np.asarray(shape[:3], dtype=np.float64)
    past = np.maximum(-0.5 - vox, vox - (size - 0.5)) * spacing
    side_mm = float(np.linalg.norm(frame_to_world[:3, 0]))
    return (past.max(axis=1) / side_mm).reshape(n + 1, n + 1, n + 1).astype(np.float32)


def cut_at_scan(sdf: torch.Tensor, box: np.ndarray) -> torch.Tensor:
    """One sample's ``sdf`` cut at the scan's box (`scan_box_sdf`): inside both, closed at the box."""
    return torch.maximum(sdf, torch.as_tensor(box, dtype=sdf.dtype, device=sdf.device))


def beyond_scan_mm(sdf: torch.Tensor, box: np.ndarray, frame_to_world: np.ndarray) -> float:
    """How far (mm) the uncut prediction reaches past the scan's field of view; 0 inside it."""
    inside = (sdf < 0).cpu().numpy()
    if not inside.any():
        return 0.0
    side_mm = float(np.linalg.norm(frame_to_world[:3, 0]))
    return max(0.0, float(box[inside].max()) * side_mm)
