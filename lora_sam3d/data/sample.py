"""The sample builders training and requests share: a slice's frame (`slice_frame`, `recentred`),
the typed `Sample` cut from it (`slice_sample`) and the scan's own ground truth around it for
scoring (`native_target`, `native_box`, `native_from_mask`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lora_sam3d.data.cache import CachedCase
from lora_sam3d.data.frame import (
    Frame,
    make_frame,
    sample_slice,
)
from lora_sam3d.data.labels import class_mask
from lora_sam3d.data.nifti import DataError
from lora_sam3d.geometry import frame_box, mask_signed_distance
from lora_sam3d.inputs import Sample

__all__ = [
    "native_box",
    "native_from_mask",
    "native_target",
    "recentred",
    "slice_frame",
    "slice_sample",
]


def native_target(case: CachedCase, bit: int, frame_to_world: np.ndarray) -> dict[str, np.ndarray]:
    """The scan's own ground truth for scoring one sample of a cached case (see `native_box`)."""
    crop, origin = case.native(bit)
    return native_box(crop, origin, case.native_affine, case.native_shape, frame_to_world)


def native_box(
    crop: np.ndarray,
    origin: np.ndarray,
    affine: np.ndarray,
    shape: tuple[int, ...],
    frame_to_world: np.ndarray,
) -> dict[str, np.ndarray]:
    """What scoring needs of a mask on a scan's grid (``affine``, ``shape``), given as the ``crop``
    at voxel ``origin`` that holds the structure: ``gt`` (bool) on the grid's box that holds both
    the structure and the frame, that box's ``affine`` (voxel -> world mm), the per-axis
    ``spacing_mm`` (3,) of the grid, and where the box sits on it (``origin`` (3,), the grid's
    ``shape`` and ``grid_affine``): the prediction voxelised on the box is the prediction on the
    whole grid, since outside the frame it is empty by construction."""
    origin = np.asarray(origin, dtype=int)
    frame_lo, frame_hi = frame_box(frame_to_world, affine, shape)
    lo, hi = np.minimum(frame_lo, origin), np.maximum(frame_hi, origin + crop.shape)
    gt = np.zeros(tuple(hi - lo), dtype=bool)
    start = origin - lo
    gt[
        start[0] : start[0] + crop.shape[0],
        start[1] : start[1] + crop.shape[1],
        start[2] : start[2] + crop.shape[2],
    ] = crop
    box_affine = affine.copy()
    box_affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return {
        "gt": gt,
        "affine": box_affine,
        "spacing_mm": np.linalg.norm(affine[:3, :3], axis=0),
        "origin": lo,
        "shape": np.asarray(shape[:3], dtype=int),
        "grid_affine": np.asarray(affine, dtype=float),
    }


def native_from_mask(
    mask: np.ndarray, affine: np.ndarray, frame_to_world: np.ndarray
) -> dict[str, np.ndarray]:
    """`native_box` of a whole-scan bool mask (a request's 3D mask)."""
    nz = np.argwhere(mask)
    lo, hi = nz.min(0), nz.max(0) + 1
    crop = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    return native_box(crop, lo, affine, mask.shape, frame_to_world)


def slice_frame(
    labels: np.ndarray, bit: int, affine: np.ndarray, spacing_mm: float, axis: int, index: int, side_mm: float
) -> tuple[Frame, np.ndarray]:
    """The frame one slice places (`make_frame`) and the slice's class mask (plane axes in order)."""
    shape = labels.shape
    if not 0 <= index < shape[axis]:
        raise DataError(
            f"slice index {index} is outside axis {axis} of the canonical (RAS) volume resampled to "
            f"{spacing_mm} mm, of shape {tuple(shape)} (0..{shape[axis] - 1} along axis {axis})"
        )
    take: list[Any] = [slice(None)] * 3
    take[axis] = index
    mask2d = class_mask(labels[tuple(take)], bit)
    if not mask2d.any():
        raise DataError(f"the mask has no voxels on slice {index} along axis {axis}")
    return make_frame(mask2d, axis, index, side_mm, spacing_mm, affine), mask2d


def recentred(frame: Frame, axis: int, centre_along_axis: float | None) -> Frame:
    """The frame a sample's first slice placed (`slice_frame`), centred at ``centre_along_axis``
    (voxels; from the other views, `lora_sam3d.data.views.seen_centre`) along ``axis`` instead of on
    the slice, which then lies off the frame's centre; unchanged when that is None."""
    if centre_along_axis is None:
        return frame
    centre = list(frame.centre_vox)
    centre[axis] = float(centre_along_axis)
    return Frame(tuple(centre), frame.side_vox, frame.grid_affine)  # type: ignore[arg-type]


def slice_sample(
    image: np.ndarray,
    labels: np.ndarray,
    frame: Frame,
    planes: list[tuple[int, int, int]],
    slice_size: int,
    most: int,
    rng: np.random.Generator | None = None,
) -> Sample:
    """A sample's model inputs from its slices, the same for training, validation and requests (no
    3D ground truth is read): the ``view_*`` tensors `lora_sam3d.inputs.collate` reads and the
    frame's placement. Each plane ``(axis, index, bit)`` of ``image`` with the mask of class ``bit``
    of ``labels`` is resampled over the frame's square at that plane, with the mask's signed 2D
    distance and the plane's offset along its axis in frame units. The first plane (the one that
    placed the frame) is always kept; a later one whose mask is empty, or crosses the plane outside
    the frame, is skipped; at most ``most`` views. Not padded: `collate` pads a batch to its most
    views. With ``rng``, the first view's intensities are augmented (a training sample)."""
    rows: list[tuple[np.ndarray, np.ndarray, int, int]] = []
    for k, (axis, index, bit) in enumerate(planes):
        if len(rows) == most:
            break
        take: list[Any] = [slice(None)] * 3
        take[axis] = index
        mask2d = class_mask(labels[tuple(take)], bit)
        if k and not mask2d.any():
            continue
        mask = sample_slice(frame, mask2d.astype(np.float32), axis, slice_size, order=0) > 0.5
        if k and not mask.any():
            continue
        plane = sample_slice(frame, np.asarray(image[tuple(take)]), axis, slice_size, order=1)
        rows.append((plane.astype(np.float32), mask, axis, index))
    offsets = [(index - frame.centre_vox[axis]) / frame.side_vox for _, _, axis, index in rows]
    sample: Sample = {  # type: ignore[typeddict-item]
        "view_image": torch.from_numpy(np.stack([r[0] for r in rows])),
        "view_mask": torch.from_numpy(np.stack([r[1] for r in rows])),
        "view_distance": torch.from_numpy(np.stack([mask_signed_distance(r[1]) for r in rows])),
        "view_axis": torch.tensor([r[2] for r in rows], dtype=torch.long),
        "view_index": torch.tensor([r[3] for r in rows], dtype=torch.long),
        "view_offset": torch.tensor(offsets, dtype=torch.float32),
        "view_valid": torch.ones(len(rows), dtype=torch.bool),
    }
    if rng is not None:
        first = sample["view_image"][0].numpy()
        first = np.clip(first * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05), 0, 1)
        sample["view_image"][0] = torch.from_numpy(first + rng.normal(0, 0.01, first.shape))
    sample["frame_to_world"] = torch.from_numpy(frame.frame_to_world)
    return sample
