"""Where to draw next: the file slice where one more drawing would tell the model most.

The result is least certain where its surface lies far from every drawn slice: there the model
guessed the shape from its training, while near a drawn slice the drawing holds it. Each candidate
slice is scored by the predicted surface it cuts, each surface voxel weighted by its distance in mm
to the nearest drawn plane; the highest score is named. Candidates lie on a file axis no drawn
slice lies on while there is one (such a slice crosses every drawn one), through the middle of the
predicted structure (as the model was trained); with every axis drawn, at the best-scoring index,
never on or beside a drawn slice. Measured on held-out phantoms in docs/benchmarks.md. The surface
is sampled every ``step_mm`` or so, so a scan-sized mask costs little. No library scores slices
this way; written here on scipy's erosion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from lora_sam3d.data.requests.items import AXIS_NAMES, file_axis

__all__ = ["where_to_draw"]


def where_to_draw(
    mask: np.ndarray,
    affine: np.ndarray,
    drawn: Sequence[dict[str, Any]],
    origin: Sequence[int] = (0, 0, 0),
    step_mm: float = 1.5,
) -> dict[str, Any] | None:
    """The slice (``{"axis": "coronal", "index": 40, "far_mm": 31.5}``, file numbering) whose drawing
    would change the result most, given the slices ``drawn`` (``result.slices``). ``mask``: the
    result on the scan's grid (``affine``), or a box of it whose first voxel is ``origin``.
    ``far_mm``: how far the named slice's surface lies from the drawn slices at most. None for an
    empty mask."""
    spacing = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    step = np.maximum(1, np.round(step_mm / spacing)).astype(int)
    inside = np.asarray(mask)[:: step[0], :: step[1], :: step[2]] != 0
    if not inside.any():
        return None
    spans = [np.flatnonzero(inside.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
    lo = np.array([s[0] for s in spans])
    box = inside[tuple(slice(s[0], s[-1] + 1) for s in spans)]
    surface = (np.argwhere(box & ~ndimage.binary_erosion(box, border_value=0)) + lo) * step + np.asarray(
        origin
    )
    planes = [(file_axis(affine, p["axis"]), int(p["index"])) for p in drawn]
    far = np.full(len(surface), np.inf)
    for a, index in planes:
        far = np.minimum(far, np.abs(surface[:, a] - index) * spacing[a])
    if not np.isfinite(far).any():
        far = np.ones(len(surface))  # nothing drawn: the slice cutting most surface
    new_axes = [a for a in range(3) if a not in {b for b, _ in planes}]
    best = (-1.0, 0, 0)
    for a in new_axes or [0, 1, 2]:  # a new axis first: it crosses every drawn slice
        indices, weight = np.unique(surface[:, a], return_inverse=True)
        score = np.bincount(weight, weights=far)
        for b, index in planes:  # a drawn slice and its neighbours are no candidates (read as one stroke)
            if b == a:
                score[np.abs(indices - index) <= 1] = -1.0
        k = int(np.argmax(score))
        if score[k] > best[0]:
            best = (float(score[k]), a, int(indices[k]))
    _, a, i = best
    if a in new_axes:  # through the predicted structure's middle, as the model was trained
        i = round(float(np.mean(spans[a])) * step[a] + origin[a])
    nearest = np.abs(surface[:, a] - i) <= step[a] // 2
    name = AXIS_NAMES[int(nib.io_orientation(affine)[a, 0])]
    return {"axis": name, "index": int(i), "far_mm": float(far[nearest].max(initial=0.0))}
