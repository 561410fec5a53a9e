"""Several views per sample: more planes of the same structure in the same scan, in the same frame.

One slice fixes an organ's shape in one plane only; users often have a few annotated slices (one
axial, one coronal and one sagittal through the organ, or every tenth axial slice). A sample
holds up to K views: the sampled slice first, then, by ``layout``,

- ``orthogonal``: the planes normal to the two other axes through the first mask's centroid
  (at most 3 views in all);
- ``parallel``: slices along the first one's axis, ``spacing_mm`` apart, alternating sides
  (+1, -1, +2, -2, ... steps);
- ``stack``: every slice ``spacing_mm`` apart along the first one's axis on which the structure
  has voxels (a user who annotates every N-th slice), the nearest ones to the first if there are
  more than the count; the frame's centre along that axis is the middle of the first and last
  slice of the stack (`seen_centre`), never the 3D truth's.

A view whose mask is empty at its plane, or whose plane leaves the volume, is skipped. Every view
is resampled over the frame's square cross-section at its plane, and its plane's position is kept
as an offset in frame units, so `lora_sam3d.models.latent.SliceUnprojection` places it in the frame.
Views are padded to K rows with ``view_valid`` marking the real ones, so a batch stacks. The frame
comes from the views only: in the first slice's plane, its mask's centroid; along the first
slice's normal, the middle of the structure's extent as the other views see it (`seen_centre`;
one slice alone puts the frame's centre on itself); its side from the per-class extent.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lora_sam3d.data.frame import Frame, plane_axes
from lora_sam3d.data.labels import class_mask
from lora_sam3d.data.nifti import DataError
from lora_sam3d.data.settings import ViewLayout

__all__ = ["ViewLayout", "seen_centre", "stack_planes", "view_planes"]


def view_planes(
    frame: Frame,
    axis: int,
    index: int,
    shape: tuple[int, ...],
    layout: ViewLayout,
    count: int,
    spacing_vox: float,
    present: np.ndarray | None = None,
) -> list[tuple[int, int]]:
    """(axis, index) of up to ``count - 1`` planes after the sampled one (``axis``, ``index``), on a
    grid of ``shape``; planes outside the grid are left out. ``stack`` needs ``present``, the slices
    along ``axis`` where the structure has voxels."""
    if count <= 1:
        return []
    if layout == "stack":
        return stack_planes(axis, index, count, spacing_vox, present)
    if layout == "parallel" and spacing_vox < 1:
        raise DataError(
            f"data.views.spacing_mm is below one voxel of the resampled grid ({spacing_vox:.2f} voxels): "
            "parallel views would repeat a plane; give at least data.preprocessing.spacing_mm"
        )
    if layout == "parallel" and (count - 1) * spacing_vox >= shape[axis]:
        raise DataError(
            f"data.views.spacing_mm: {count} parallel views {spacing_vox:.1f} voxels apart span "
            f"{(count - 1) * spacing_vox:.0f} voxels along axis {axis}, more than the scan's "
            f"{shape[axis]}: the views would leave the scan; give a smaller spacing or fewer views"
        )
    if layout == "orthogonal":
        planes = [(a, int(np.rint(frame.centre_vox[a]))) for a in plane_axes(axis)]
    else:
        steps = [s for j in range(1, count) for s in (j, -j)]
        planes = [(axis, int(np.rint(index + s * spacing_vox))) for s in steps]
    return [(a, i) for a, i in planes if 0 <= i < shape[a]][: count - 1]


def stack_planes(
    axis: int, index: int, count: int, spacing_vox: float, present: np.ndarray | None
) -> list[tuple[int, int]]:
    """A stack's planes after the sampled one: every ``spacing_vox`` from it, alternating sides,
    kept while the structure has voxels there (``present``), at most ``count - 1``; none when the
    structure is thinner than the spacing there (`lora_sam3d.data.dataset` warns or refuses)."""
    if present is None:
        raise ValueError("view_planes: the stack layout needs the structure's slices (present)")
    if spacing_vox < 1:
        raise DataError(
            f"data.views.spacing_mm is below one voxel of the resampled grid ({spacing_vox:.2f} voxels): "
            "stacked views would repeat a plane; give at least data.preprocessing.spacing_mm"
        )
    inside = set(np.flatnonzero(present).tolist())
    planes: list[tuple[int, int]] = []
    for j in range(1, len(present)):
        steps = [int(np.rint(index + s * j * spacing_vox)) for s in (1, -1)]
        found = [(axis, i) for i in steps if i in inside]
        if not found and all(i < 0 or i >= len(present) for i in steps):
            break
        planes += found
    return planes[: count - 1]


def seen_centre(
    labels: np.ndarray, bits: list[int], planes: list[tuple[int, int]], axis: int, index: int
) -> float | None:
    """The middle (voxels) of the structure's extent along ``axis`` as the views see it, or None when
    none sees it. A view across ``axis`` sees the structure's extent in its mask (view k's mask is
    class bit ``bits[k]``); views parallel to the first slice (``index``), a stack, bound it by their
    planes. One slice alone cannot see its own normal direction."""
    lo, hi = np.inf, -np.inf
    stacked = [i for a, i in planes if a == axis]
    if stacked:
        lo, hi = float(min([*stacked, index])), float(max([*stacked, index]))
    for bit, (view_axis, plane) in zip(bits, planes, strict=True):
        if view_axis == axis:
            continue
        take: list[Any] = [slice(None)] * 3
        take[view_axis] = plane
        mask2d = class_mask(labels[tuple(take)], bit)
        along = np.flatnonzero(mask2d.any(axis=1 - plane_axes(view_axis).index(axis)))
        if along.size:
            lo, hi = min(lo, float(along[0])), max(hi, float(along[-1]))
    return None if lo > hi else (lo + hi) / 2
