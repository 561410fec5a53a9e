"""A request as the user writes it (`PredictItem`) and its slices addressed as a viewer shows them:
the file's own axis and index, or a world position (`locate_slice`, `SliceRef`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

from lora_sam3d.data.nifti import DataError
from lora_sam3d.data.settings import Context
from lora_sam3d.data.volume import IsotropicGrid
from lora_sam3d.geometry import AXIS_NAMES

__all__ = [
    "PredictItem",
    "SliceRef",
    "as_given",
    "file_axis",
    "file_slices_read",
    "grid_slice",
    "locate_slice",
    "parse_axis",
]


@dataclass
class PredictItem:
    """One reconstruction request on a new scan.

    Args:
        image: the scan (NIfTI).
        mask: the structure on that slice: a 3D mask on the scan's grid (non-zero voxels, or voxels
            equal to ``label_value`` of a label map), or a 2D mask of the slice only (2D NIfTI, or
            a PNG whose rows and columns are the slice's first and second file axes).
        class_name: which structure (picks the frame extent and, with several adapters, the adapter).
        axis: ``sagittal``, ``coronal`` or ``axial`` (or 0, 1, 2): the world direction the slice is
            cut across.
        index: the slice number in the file's own voxel numbering along the file axis closest to
            ``axis`` (what viewers show), 0-based.
        position_mm: instead of ``index``: the world (RAS) coordinate of the slice plane along
            ``axis``, in mm; the nearest file slice is used.
        label_value: with a label map, the value that marks the structure.
        slices: instead of ``axis`` and ``index``/``position_mm``: several slices of the same scan
            (views), each ``{axis, index}`` or ``{axis, position_mm}``, optionally with its own
            ``mask`` (e.g. a 2D mask of that slice) and ``label_value``; by default the item's
            ``mask`` cut at that plane. They are a set: the frame and the output names come from
            them in one order (axial, coronal, sagittal; along one direction by position), whatever
            order they are given in; two that land on one slice of the model's grid are refused.
        context: ``none`` to reconstruct from the slices alone although the run reads the scan as
            context (``data.context.source: volume``); ``volume`` asks for it; None: as the run.
        scored: whether a 3D ``mask`` is also the structure's truth to score against (a drawing,
            3D but only painted on its slices, is not).
        truth: another 3D mask of the structure to score against (any non-zero voxel).
    """

    image: str
    mask: str
    class_name: str
    axis: int | str = "axial"
    index: int | float | None = None  # a whole number: 16.0 is slice 16, 16.5 is refused
    position_mm: float | None = None
    label_value: int | None = None
    slices: list[dict[str, Any]] | None = None
    context: Context | None = None
    scored: bool = True
    truth: str | None = None

    def planes(self) -> list[dict[str, Any]]:
        """The item's slices, each ``{axis, index, position_mm, mask, label_value}`` (one unless ``slices``)."""
        if not self.slices:
            return [
                {
                    "axis": self.axis,
                    "index": self.index,
                    "position_mm": self.position_mm,
                    "mask": self.mask,
                    "label_value": self.label_value,
                }
            ]
        if self.index is not None or self.position_mm is not None:
            raise DataError("give slices or index/position_mm, not both")
        out = []
        for k, view in enumerate(self.slices, start=1):
            unknown = set(view) - {"axis", "index", "position_mm", "mask", "label_value", "image"}
            if unknown:
                raise DataError(
                    f"slice {k}: unknown keys {sorted(unknown)} (axis, index or position_mm, mask, label_value)"
                )
            if view.get("image") not in (None, self.image):
                raise DataError(
                    f"slice {k} is of image {view['image']} but the request's image is {self.image}: one "
                    "request reconstructs from slices of one scan"
                )
            out.append(
                {
                    "axis": view.get("axis", "axial"),
                    "index": view.get("index"),
                    "position_mm": view.get("position_mm"),
                    "mask": view.get("mask", self.mask),
                    "label_value": view.get("label_value", self.label_value),
                }
            )
        return out


def parse_axis(axis: int | str) -> int:
    """``sagittal``/``coronal``/``axial`` or 0/1/2 -> 0/1/2."""
    if isinstance(axis, str) and axis.strip().lower() in AXIS_NAMES:
        return AXIS_NAMES.index(axis.strip().lower())
    if isinstance(axis, int) and not isinstance(axis, bool) and axis in (0, 1, 2):
        return axis
    raise DataError(f"axis {axis!r}; expected one of sagittal, coronal, axial (or 0, 1, 2)")


@dataclass
class SliceRef:
    """Where a request's slice is: world direction, file axis and index, and the plane's world position."""

    axis: int
    file_axis: int
    index: int
    centre_mm: np.ndarray  # (3,) world RAS point at the centre of the file slice
    grid_index: int = -1  # the slice of the model's resampled grid the model reads (`grid_slice`)

    @property
    def position_mm(self) -> float:
        """The plane's world coordinate along ``axis`` (at the slice's centre on an oblique scan)."""
        return float(self.centre_mm[self.axis])

    @property
    def name(self) -> str:
        """``axial57``: the direction and the file's slice number, as a viewer shows it."""
        return f"{AXIS_NAMES[self.axis]}{self.index}"

    @property
    def order(self) -> tuple[int, float]:
        """Where the slice sorts among a request's slices: axial, coronal, sagittal, then by position."""
        return (-self.axis, self.position_mm)


def grid_slice(ref: SliceRef, grid: IsotropicGrid) -> int:
    """The slice along ``ref.axis`` of the model's resampled grid nearest to the file slice's plane,
    within the grid (a file's last slice may lie up to one model voxel past the grid's last one)."""
    to_grid = np.linalg.inv(grid.affine)
    along = nib.affines.apply_affine(to_grid, ref.centre_mm)[ref.axis]
    return int(np.clip(np.rint(along), 0, grid.shape[ref.axis] - 1))


def file_slices_read(ref: SliceRef, img: nib.Nifti1Image, grid: IsotropicGrid) -> list[int]:
    """The file slices along ``ref.file_axis`` on either side of the plane of the model's grid slice
    ``ref.grid_index``: the resampling reads the grid slice's labels from one of them, so a request
    mask written on these (and on its own slice) always reaches the model, at a scan's edge too."""
    point = nib.affines.apply_affine(np.linalg.inv(grid.affine), ref.centre_mm)
    point[ref.axis] = ref.grid_index
    world = nib.affines.apply_affine(grid.affine, point)
    along = nib.affines.apply_affine(np.linalg.inv(img.affine), world)[ref.file_axis]
    n = img.shape[ref.file_axis]
    return sorted({ref.index, *(int(np.clip(i, 0, n - 1)) for i in (np.floor(along), np.ceil(along)))})


def file_axis(affine: np.ndarray, axis: int | str) -> int:
    """The file axis that runs closest to world ``axis`` (``axial`` or 2, ...; nibabel's orientation)."""
    return int(np.flatnonzero(nib.io_orientation(affine)[:, 0] == parse_axis(axis))[0])


def locate_slice(img: nib.Nifti1Image, axis: int, index: int | None, position_mm: float | None) -> SliceRef:
    """The file slice of ``img`` (in its own orientation) that a request names, checked against the file."""
    if img.ndim != 3:
        raise DataError(f"image has shape {img.shape}: expected a 3D volume")
    if (index is None) == (position_mm is None):
        raise DataError(
            "give either index (the file's slice number) or position_mm (the plane's world coordinate)"
        )
    along = file_axis(img.affine, axis)
    n = img.shape[along]
    centre = (np.asarray(img.shape, dtype=float) - 1) / 2

    def centre_of(i: float) -> np.ndarray:
        voxel = centre.copy()
        voxel[along] = i
        return nib.affines.apply_affine(img.affine, voxel)

    first, last = float(centre_of(0)[axis]), float(centre_of(n - 1)[axis])
    if index is None:
        assert position_mm is not None
        step = (last - first) / max(n - 1, 1)
        found = round((position_mm - first) / step) if step else 0
        half = abs(step) / 2
        if not (min(first, last) - half <= position_mm <= max(first, last) + half):
            raise DataError(
                f"position_mm {position_mm} is outside the scan: its {AXIS_NAMES[axis]} planes run from "
                f"{min(first, last):.1f} to {max(first, last):.1f} mm"
            )
        index = int(np.clip(found, 0, n - 1))
    if isinstance(index, np.integer | np.floating | float) and float(index).is_integer():
        index = int(index)  # 16.0 from a computation or a YAML file is slice 16
    if not isinstance(index, int) or isinstance(index, bool):
        raise DataError(f"index must be a whole slice number of the file, got {index!r}")
    if not 0 <= index < n:
        raise DataError(
            f"index {index} is outside the file's {AXIS_NAMES[axis]} axis (file axis {along}, "
            f"slices 0..{n - 1})"
        )
    return SliceRef(axis, along, index, centre_of(index))


def as_given(item: PredictItem) -> str:
    """The item's slices as the user wrote them (``axial index 16``, ``coronal position_mm 12.5``)."""

    def one(axis: Any, index: Any, position_mm: Any) -> str:
        return f"{axis} index {index}" if position_mm is None else f"{axis} position_mm {position_mm}"

    if not item.slices:
        return one(item.axis, item.index, item.position_mm)
    views = [one(v.get("axis", "axial"), v.get("index"), v.get("position_mm")) for v in item.slices]
    return "slices " + ", ".join(views)
