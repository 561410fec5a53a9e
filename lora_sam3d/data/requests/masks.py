"""The user's masks as they have them: a 3D mask or label map on the scan's grid, or a 2D mask of
one slice (NIfTI or PNG), read and checked against the scan's grid; slices that contradict each
other where they cross are found (`contradicting_pairs`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from lora_sam3d.data.labels import integer_labels, structure_mask
from lora_sam3d.data.nifti import DataError, affine_difference
from lora_sam3d.data.requests.items import SliceRef

__all__ = [
    "DRAWN_FRAME_SHARE",
    "ONE_SLICE_FRAME_SHARE",
    "apart_pairs",
    "check_mask_grid",
    "contradicting_pairs",
    "drawn_extent_mm",
    "frame_side_mm",
    "load_mask_nifti",
    "mask_exists",
    "masks_in_memory",
    "read_mask_volume",
    "read_png_mask",
    "read_slice_mask",
    "request_frame",
]


def read_png_mask(path: Path, label_value: int | None) -> np.ndarray:
    """A 2D mask drawn or exported as an image, as integer levels: palette images through their
    palette (index 0 may be any colour), colour images by luminance. Refused with the reason: JPEG
    (lossy: edges blur into extra levels), and without ``label_value`` more than two levels (an
    anti-aliased or soft-edged mask, whose edge pixels are neither in nor out)."""
    from PIL import Image

    if path.suffix.lower() in (".jpg", ".jpeg"):
        raise DataError(
            f"mask {path} is a JPEG: its lossy compression blurs the mask's edge into extra grey levels; "
            "save the mask as PNG or NIfTI"
        )
    try:
        image = Image.open(path)
        if image.mode in ("P", "PA", "RGB", "RGBA", "LA"):
            image = image.convert("RGB").convert("L")
        data = np.asarray(image)
    except Exception as err:
        raise DataError(f"mask {path} is not a readable image: {err}") from err
    levels = np.unique(data)
    if label_value is None and len(levels) > 2:
        raise DataError(
            f"mask {path} has {len(levels)} grey levels (e.g. {levels[:6].tolist()}): expected a binary mask "
            "(two levels); an anti-aliased or soft-edged export leaves edge pixels neither in nor out. "
            "Export it without smoothing, or give label_value for a label map"
        )
    return data.astype(np.int64)


def read_slice_mask(path: Path, img: nib.Nifti1Image, ref: SliceRef, label_value: int | None) -> np.ndarray:
    """The request's mask on its slice, (a, b) bool in the file's axis order, whatever form it came in:
    a 3D mask or label map on the scan's grid, a 2D NIfTI (or a one-slice 3D one, e.g. (X, Y, 1)), or
    an image (`read_png_mask`). Values are read as training labels are (`integer_labels`)."""
    want = tuple(s for i, s in enumerate(img.shape) if i != ref.file_axis)
    whole_file = True  # the data read is the whole mask file (a 2D mask), not one slice of a 3D one
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
        data = read_png_mask(path, label_value)
    else:
        mask_img = load_mask_nifti(path)
        if len(mask_img.shape) == 3 and mask_img.shape != img.shape and sorted(mask_img.shape)[0] == 1:
            data = integer_labels(
                np.squeeze(np.asarray(mask_img.dataobj), axis=mask_img.shape.index(1)), path, "mask"
            )
        elif len(mask_img.shape) == 3:
            check_mask_grid(mask_img, img, path)
            take: list[Any] = [slice(None)] * 3
            take[ref.file_axis] = ref.index
            data = integer_labels(np.asarray(mask_img.dataobj[tuple(take)]), path, "mask")
            whole_file = False
        else:
            data = integer_labels(np.asarray(mask_img.dataobj), path, "mask")
    if data.shape != want:
        raise DataError(
            f"2D mask {path} has shape {data.shape} but {ref.name} (file axis {ref.file_axis}) of the image "
            f"has shape {want}"
        )
    mask = structure_mask(data, label_value, path, value_required=whole_file)
    if not mask.any():
        raise DataError(
            f"mask {path} has no voxels on {ref.name} (file axis {ref.file_axis}, index {ref.index})"
        )
    return mask


IN_MEMORY: dict[str, nib.Nifti1Image] = {}
"""Masks held in memory under the path a request names (`masks_in_memory`): read as that file would be."""


@contextmanager
def masks_in_memory(images: Mapping[str, nib.Nifti1Image]) -> Iterator[None]:
    """While the block runs, requests naming these paths read these images (a drawing in a viewer,
    an array in a notebook) instead of files: nothing is written or read back."""
    IN_MEMORY.update(images)
    try:
        yield
    finally:
        for key in images:
            IN_MEMORY.pop(key, None)


def mask_exists(path: str | Path) -> bool:
    """A mask a request may name: a file, or an image held in memory under that path."""
    return str(path) in IN_MEMORY or Path(path).is_file()


def load_mask_nifti(path: Path) -> nib.Nifti1Image:
    if str(path) in IN_MEMORY:
        return IN_MEMORY[str(path)]
    try:
        return nib.load(str(path))
    except Exception as err:
        raise DataError(f"mask {path} is not a readable NIfTI file: {err}") from err


def check_mask_grid(mask_img: nib.Nifti1Image, img: nib.Nifti1Image, path: Path) -> None:
    """A 3D request mask must lie on the scan's grid: the message says which of shape and affine differs."""
    if mask_img.shape != img.shape:
        raise DataError(
            f"mask {path} has shape {mask_img.shape} but the image has {img.shape}: a 3D mask must be on "
            "the scan's grid"
        )
    if not np.allclose(mask_img.affine, img.affine, atol=1e-3):
        raise DataError(
            f"mask {path} has the image's shape {img.shape} but another grid (affine): "
            f"{affine_difference(mask_img.affine, img.affine)}; a 3D mask must be on the scan's grid"
        )


def read_mask_volume(path: Path, img: nib.Nifti1Image, label_value: int | None) -> np.ndarray | None:
    """The whole 3D mask of a request (bool, the scan's grid and orientation), or None when the mask
    is 2D (a slice only: nothing to score against)."""
    if path.suffix.lower() not in (".nii", ".gz"):
        return None
    mask_img = load_mask_nifti(path)
    if len(mask_img.shape) != 3 or mask_img.shape != img.shape:
        return None
    return structure_mask(integer_labels(np.asarray(mask_img.dataobj), path, "mask"), label_value, path)


def contradicting_pairs(refs: list[SliceRef], masks: list[np.ndarray]) -> list[tuple[int, int]]:
    """Pairs of slices (indices into ``refs``) of different file axes whose masks (file orientation)
    mark no common voxel on the line where the two planes cross, while at least one marks some:
    masks of one structure must agree there."""
    pairs = []
    for a in range(len(refs)):
        for b in range(a + 1, len(refs)):
            if refs[a].file_axis == refs[b].file_axis:
                continue
            line_a = _line(masks[a], refs[a].file_axis, refs[b].file_axis, refs[b].index)
            line_b = _line(masks[b], refs[b].file_axis, refs[a].file_axis, refs[a].index)
            if (line_a.any() or line_b.any()) and not (line_a & line_b).any():
                pairs.append((a, b))
    return pairs


def _line(mask: np.ndarray, own_axis: int, other_axis: int, other_index: int) -> np.ndarray:
    """The row of a slice's 2D mask (its two file axes in order) at ``other_index`` along ``other_axis``."""
    dims = [d for d in range(3) if d != own_axis]
    return np.take(mask, other_index, axis=dims.index(other_axis))


def apart_pairs(refs: Sequence[Any], masks: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    """Pairs (a, b) of neighbouring parallel slices (same file axis, none between them) whose masks
    share no pixel in-plane: the structure would have to jump between them (a slice drawn shifted,
    or another structure), so nothing between them can be interpolated."""
    out = []
    for axis in {r.file_axis for r in refs}:
        along = sorted((r.index, k) for k, r in enumerate(refs) if r.file_axis == axis)
        out += [(a, b) for (_, a), (_, b) in pairwise(along) if not (masks[a] & masks[b]).any()]
    return out


def drawn_extent_mm(planes: Sequence[tuple[int, int, np.ndarray]], spacing: Sequence[float]) -> float:
    """The largest side, in mm, of the box holding drawn masks on their file slices: ``planes`` are
    (file axis, slice index, 2D mask over the other two file axes in order); 0 when nothing is drawn.
    Several slices measure the structure in 3D; one slice measures it in-plane only."""
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for axis, index, plane in planes:
        plane = np.asarray(plane) != 0
        if not plane.any():
            continue
        for k, a in enumerate(b for b in range(3) if b != axis):
            idx = np.flatnonzero(plane.any(axis=1 - k))
            lo[a], hi[a] = min(lo[a], idx[0]), max(hi[a], idx[-1])
        lo[axis], hi[axis] = min(lo[axis], index), max(hi[axis], index)
    sides = np.where(np.isfinite(lo), (hi - lo + 1) * np.asarray(spacing, dtype=float), 0.0)
    return float(sides.max())


DRAWN_FRAME_SHARE = 0.85
"""A frame measured from a drawing of several slices is this share of the model's frame scale (1.7 x
the drawn extent where the model frames a class at 2 x its extent): the drawing bounds the structure
itself, where a class's extent is an upper bound over cases, so less margin is needed and the cells
come finer. Chosen on the validation phantoms among 0.7-1.0 (docs/experiment.md)."""


ONE_SLICE_FRAME_SHARE = 1.0
"""The share of the model's frame scale a request of one slice framed by its class's extent takes:
the whole, so the request's input is the split's sample of the same slice (as trained and
validated). 0.9 scored higher (validation phantoms 0.903 -> 0.909, held out 0.905 -> 0.910,
MR-like 0.864 -> 0.873; docs/experiment.md) but would part requests from those samples."""


def frame_side_mm(source: str, extent_mm: float, frame_scale: float, slices: int) -> float:
    """A request's frame side from where its extent came (`request_frame`) and its number of slices:
    a drawing's extent keeps `DRAWN_FRAME_SHARE` of the model's margin, a class's extent for one slice
    `ONE_SLICE_FRAME_SHARE`, for several all of it."""
    if source == "the drawing":
        return frame_scale * extent_mm * DRAWN_FRAME_SHARE
    return frame_scale * extent_mm * (ONE_SLICE_FRAME_SHARE if slices == 1 else 1.0)


def request_frame(
    frame_from: str, refs: Sequence[Any], masks: Sequence[np.ndarray], affine: np.ndarray, class_mm: float
) -> tuple[str, float]:
    """Where a request's frame extent comes from, and the extent (mm): with ``frame_from`` "auto" and
    several slices, the drawing's (`drawn_extent_mm`); else the class's."""
    if frame_from == "auto" and len(refs) > 1:
        planes = [(r.file_axis, r.index, m) for r, m in zip(refs, masks, strict=True)]
        drawn = drawn_extent_mm(planes, np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
        if drawn > 0:
            return "the drawing", drawn
    return "the class's extent", class_mm
