"""Reconstruction requests on new scans, addressed as a viewer shows them.

A user reads "axial slice 57" in 3D Slicer, ITK-SNAP or nibabel: slice 57 of the *file's own*
voxel numbering along the file axis closest to the axial direction. `PredictItem` takes that
(``axis: axial, index: 57``), or the plane's world coordinate (``position_mm``, RAS), and a mask
as the user has it: a 3D mask or label map on the scan's grid, or a 2D mask of that slice only
(2D NIfTI or PNG). `locate_slice` turns the request into the file axis and index (nibabel's
``io_orientation`` names the closest axis), and `PredictionDataset` into the model's input on
the canonical isotropic grid the model works on. Requests are checked when the dataset is built,
in the main process, so a bad one is reported once, by its number.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset

from lora_sam3d.data.cases import check_class_names
from lora_sam3d.data.dataset import native_from_mask, recentred, slice_frame, slice_sample
from lora_sam3d.data.frame import sample_context
from lora_sam3d.data.settings import Context, DataContract
from lora_sam3d.data.tissue import (
    Tissue,
    drawn_views,
    marked_tissue,
    relative_sample,
    tissue_mismatch,
    views_inside,
)
from lora_sam3d.data.views import seen_centre
from lora_sam3d.data.volume import (
    DataError,
    IsotropicGrid,
    Preprocessing,
    affine_difference,
    canonical_grid,
    integer_labels,
    intensity_mismatch,
    load_volume,
    structure_mask,
)
from lora_sam3d.geometry import AXIS_NAMES
from lora_sam3d.inputs import Sample, output_stem

__all__ = [
    "PredictItem",
    "PredictionDataset",
    "SliceRef",
    "case_name",
    "case_names",
    "check_mask_grid",
    "contradicting_pairs",
    "load_mask_nifti",
    "locate_slice",
    "parse_axis",
    "read_mask_volume",
    "read_png_mask",
    "read_slice_mask",
]

"""World (RAS) directions by index: 0 sagittal (x, R-L), 1 coronal (y, A-P), 2 axial (z, S-I)."""


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


def locate_slice(img: nib.Nifti1Image, axis: int, index: int | None, position_mm: float | None) -> SliceRef:
    """The file slice of ``img`` (in its own orientation) that a request names, checked against the file."""
    if img.ndim != 3:
        raise DataError(f"image has shape {img.shape}: expected a 3D volume")
    if (index is None) == (position_mm is None):
        raise DataError(
            "give either index (the file's slice number) or position_mm (the plane's world coordinate)"
        )
    ornt = nib.io_orientation(img.affine)
    file_axis = int(np.flatnonzero(ornt[:, 0] == axis)[0])
    n = img.shape[file_axis]
    centre = (np.asarray(img.shape, dtype=float) - 1) / 2

    def centre_of(i: float) -> np.ndarray:
        voxel = centre.copy()
        voxel[file_axis] = i
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
            f"index {index} is outside the file's {AXIS_NAMES[axis]} axis (file axis {file_axis}, "
            f"slices 0..{n - 1})"
        )
    return SliceRef(axis, file_axis, index, centre_of(index))


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


def load_mask_nifti(path: Path) -> nib.Nifti1Image:
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


def _as_given(item: PredictItem) -> str:
    """The item's slices as the user wrote them (``axial index 16``, ``coronal position_mm 12.5``)."""

    def one(axis: Any, index: Any, position_mm: Any) -> str:
        return f"{axis} index {index}" if position_mm is None else f"{axis} position_mm {position_mm}"

    if not item.slices:
        return one(item.axis, item.index, item.position_mm)
    views = [one(v.get("axis", "axial"), v.get("index"), v.get("position_mm")) for v in item.slices]
    return "slices " + ", ".join(views)


def case_names(images: Sequence[str | Path]) -> list[str]:
    """A case id per image, distinct for distinct files: `case_name`, prefixed by as many parent
    folders as it takes where two files would share one (``p1/CT/ct.nii.gz`` and ``p2/CT/ct.nii.gz``
    -> ``p1-CT`` and ``p2-CT``); other files keep their plain case name."""
    paths = [Path(i).resolve() for i in images]
    depth = dict.fromkeys(paths, 0)

    def name(path: Path) -> str:
        folders = (
            path.parent.parts[1:]
            if path.name.split(".")[0] in ("ct", "image", "mr", "mri")
            else path.parts[1:-1]
        )
        parents = folders[: len(folders) - 1] if folders and case_name(path) == folders[-1] else folders
        return "-".join(
            [*parents[len(parents) - depth[path] :], case_name(path)] if depth[path] else [case_name(path)]
        )

    while True:
        groups: dict[str, set[Path]] = {}
        for path in depth:
            groups.setdefault(name(path), set()).add(path)
        clashes = [g for g in groups.values() if len(g) > 1]
        if not clashes:
            return [name(p) for p in paths]
        for group in clashes:
            for path in group:
                if depth[path] >= len(path.parts):
                    raise DataError(f"cannot name the outputs of {sorted(map(str, group))} apart")
                depth[path] += 1


def case_name(image: str | Path) -> str:
    """The case id of an image: its folder for TotalSegmentator's ``<case>/ct.nii.gz`` (or ``mri.nii.gz``), else the file stem."""
    path = Path(image)
    stem = path.name.removesuffix(".gz").removesuffix(".nii")
    return path.parent.name if stem in ("ct", "image", "mr", "mri") and path.parent.name else stem


class PredictionDataset(Dataset):
    """Input samples (no ground truth) for `PredictItem`s.

    Each request's slice is located in its file and its mask read when the dataset is built; a
    sample is then the model's input on the canonical grid resampled to ``prep.spacing_mm``, at the
    canonical slice through the file slice's plane.
    """

    def __init__(
        self,
        items: Sequence[PredictItem | Mapping[str, Any]],
        prep: Preprocessing,
        extent_mm: Mapping[str, float],
        frame_scale: float,
        slice_size: int,
        intensity_check: Literal["warn", "error"] = "warn",
        context: Context = "none",
        context_cells: int = 64,
        scan_readable: bool | None = None,
        tissue: Mapping[str, Sequence[float]] | None = None,
        reading: str = "absolute",
    ) -> None:
        self.tissue = dict(tissue or {})  # per class, the training scans' tissue (`tissue_ranges`)
        self.reading = reading  # how the model reads the scan (`ContextSettings.reading`)
        self.intensity_check = intensity_check
        self.context, self.context_cells = context, context_cells
        # whether the model reads the scan at all (then a request without it is named ..._noscan)
        self.scan_readable = context == "volume" if scan_readable is None else scan_readable
        self.items = [i if isinstance(i, PredictItem) else PredictItem(**i) for i in items]
        self.prep, self.extent_mm, self.frame_scale, self.slice_size = (
            prep,
            dict(extent_mm),
            frame_scale,
            slice_size,
        )
        self.slices: list[list[SliceRef]] = []  # per item, its views (the first places the frame)
        self.masks: list[list[np.ndarray]] = []
        self.grids: list[IsotropicGrid] = []  # per item, the model's grid of its scan
        self._finite: set[str] = set()
        self._whole_masks: set[tuple[str, int | None]] = set()  # (3D mask, label value) pairs checked
        for k, item in enumerate(self.items, start=1):
            try:
                self._check(item)
            except DataError as err:
                raise DataError(
                    f"predict item {k} ({item.class_name} in {item.image}, {_as_given(item)}): {err}"
                ) from None
        self.case_ids = case_names([item.image for item in self.items])

    def check_view_counts(self, trained: int | None, asked: int | None) -> None:
        """Refuse a request with more slices (those with mask voxels) than the model was ``trained``
        with, or than ``data.views.count`` ``asked`` for when the config gives it: never a silent choice."""
        for k, refs in enumerate(self.slices, start=1):
            n, names = len(refs), "+".join(r.name for r in refs)
            if trained is not None and n > trained:
                raise DataError(
                    f"predict item {k} ({names}): {n} views asked (its slices with mask voxels) but the model "
                    f"was trained with at most {trained} view{'s' if trained > 1 else ''}: ask for {trained} "
                    f"or fewer, or train with data.views.count: {n}"
                )
            if asked is not None and n > asked:
                raise DataError(
                    f"predict item {k} ({names}) has {n} slices with mask voxels but data.views.count is {asked}: "
                    f"give data.views.count: {n} (at most what the model was trained with) or fewer slices"
                )

    def check_unique_outputs(self) -> None:
        """Refuse two requests that would write the same output files (same scan, structure and slice)."""
        stems: dict[str, int] = {}
        for k, stem in enumerate(self.stems, start=1):
            if stem in stems:
                raise DataError(
                    f"predict items {stems[stem]} and {k} ask for the same reconstruction ({stem}: same scan, "
                    "structure, slices and reading of the scan), so the second would overwrite the first's "
                    "files; remove one"
                )
            stems[stem] = k

    def reads_scan(self, i: int) -> bool:
        """Whether request ``i``'s sample carries the scan: its own ``context``, else the run's."""
        return (self.items[i].context or self.context) == "volume"

    @property
    def stems(self) -> list[str]:
        """Each request's output name (`output_stem`: ``<case>_<class>_<slices>``, ``_noscan`` when a
        model that reads the scan does not for it); unique within the request list."""
        return [
            output_stem(
                c,
                i.class_name,
                "+".join(r.name for r in refs),
                self.reads_scan(k) if self.scan_readable else None,
            )
            for k, (c, i, refs) in enumerate(zip(self.case_ids, self.items, self.slices, strict=True))
        ]

    @classmethod
    def from_settings(
        cls,
        items: Sequence[PredictItem | Mapping[str, Any]],
        data: DataContract | Mapping[str, Any],
        extent_mm: Mapping[str, float] | None = None,
        intensity_check: Literal["warn", "error"] = "warn",
        context: Context = "none",
    ) -> PredictionDataset:
        """The requests read as a model was trained to read scans: ``data`` is the `DataContract` a
        checkpoint or adapter folder stores (or its dict); ``extent_mm`` overrides stored extents;
        ``context``: whether the samples carry the scan (items may say otherwise)."""
        c = data if isinstance(data, DataContract) else DataContract.from_dict(data)
        extents = {**c.extent_mm, **(extent_mm or {})}
        cells = 4 * (c.resolution or c.slice_size // 4)
        return cls(
            items,
            c.prep,
            extents,
            c.frame_scale,
            c.slice_size,
            intensity_check,
            context,
            cells,
            c.context == "volume",
            c.tissue,
            c.context_reading,
        )

    def _check(self, item: PredictItem) -> None:
        check_class_names([item.class_name], "class_name")
        if item.class_name not in self.extent_mm:
            raise DataError(
                f"class {item.class_name!r} has no frame extent; known: {sorted(self.extent_mm)} "
                "(set data.frame.extent_mm, or use a checkpoint that stores its classes' extents)"
            )
        if not Path(item.image).is_file():
            raise DataError(f"image {item.image} does not exist")
        try:
            img = nib.load(item.image)
        except Exception as err:
            raise DataError(f"image {item.image} is not a readable NIfTI file: {err}") from err
        refs, masks = [], []
        for k, plane in enumerate(item.planes(), start=1):
            if not Path(plane["mask"]).is_file():
                raise DataError(f"mask {plane['mask']} does not exist")
            # a 3D mask is checked whole (a label map without label_value, a value it lacks) before any slice
            if (plane["mask"], plane["label_value"]) not in self._whole_masks:
                read_mask_volume(Path(plane["mask"]), img, plane["label_value"])
                self._whole_masks.add((plane["mask"], plane["label_value"]))
            ref = locate_slice(img, parse_axis(plane["axis"]), plane["index"], plane["position_mm"])
            if any((r.file_axis, r.index) == (ref.file_axis, ref.index) for r in refs):
                raise DataError(
                    f"slice {k} ({ref.name}) is a plane given before: each slice must be another plane"
                )
            try:
                masks.append(read_slice_mask(Path(plane["mask"]), img, ref, plane["label_value"]))
            except DataError as err:
                if not item.slices or "has no voxels on" not in str(err):
                    raise
                warnings.warn(
                    f"{item.class_name} in {item.image}: slice {k} ({ref.name}) skipped: {err}", stacklevel=2
                )
                continue
            refs.append(ref)
        if not refs:
            raise DataError(f"no slice of {item.class_name} has mask voxels: nothing to reconstruct from")
        for a, b in contradicting_pairs(refs, masks):
            warnings.warn(
                f"{item.class_name} in {item.image}: the masks of slices {a + 1} ({refs[a].name}) and {b + 1} "
                f"({refs[b].name}) do not overlap on the line where their planes cross: is one of them wrong?",
                stacklevel=2,
            )
        grid = IsotropicGrid.of(*canonical_grid(img), self.prep.spacing_mm)
        refs = self._on_grid(refs, grid)
        self.grids.append(grid)
        # the slices as a set: one order whatever order they came in, so the frame and the names are too
        order = sorted(range(len(refs)), key=lambda j: refs[j].order)
        self.slices.append([refs[j] for j in order])
        self.masks.append([masks[j] for j in order])
        if item.image not in self._finite:  # each scan read once here, so a bad one fails before any output
            self._check_intensities(item.image, img)
            self._finite.add(item.image)

    def _check_intensities(self, path: str, img: nib.Nifti1Image) -> None:
        """The scan's voxels are readable and finite, and look like the modality the model reads
        (`intensity_mismatch`: a warning, or an error with ``intensity_check: error``)."""
        try:
            values = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as err:
            raise DataError(f"image {path} cannot be read (truncated or corrupt?): {err}") from err
        bad = int((~np.isfinite(values)).sum())
        if bad:
            raise DataError(f"image {path} has {bad} NaN/inf voxels: intensities must be finite")
        why = intensity_mismatch(values, self.prep, path)
        if why and self.intensity_check == "error":
            raise DataError(f"{why} (data.predict.intensity_check: error refuses it; warn only warns)")
        if why:
            warnings.warn(why, stacklevel=3)

    def _on_grid(self, refs: list[SliceRef], grid: IsotropicGrid) -> list[SliceRef]:
        """The refs with the slice of the model's grid each one is read on; two on one grid slice
        would be one view read twice, so that is refused, naming both."""
        placed = [replace(r, grid_index=grid_slice(r, grid)) for r in refs]
        seen: dict[tuple[int, int], SliceRef] = {}
        for ref in placed:
            other = seen.setdefault((ref.axis, ref.grid_index), ref)
            if other is not ref:
                raise DataError(
                    f"slices {other.name} and {ref.name} land on one slice of the model's grid "
                    f"({self.prep.spacing_mm:g} mm spacing), so they would be one view read twice: give "
                    f"slices at least {self.prep.spacing_mm:g} mm apart, or one of them"
                )
        return placed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        item, refs = self.items[i], self.slices[i]
        raw = nib.load(item.image)
        try:
            sample = self._inputs(i, raw)
        except DataError as err:
            raise DataError(f"predict item {i + 1} (image {item.image}, mask {item.mask}): {err}") from err
        truth = read_mask_volume(Path(item.mask), raw, item.label_value)
        frame_to_world = np.asarray(sample["frame_to_world"], dtype=np.float64)
        return sample | {
            "case_id": self.case_ids[i],
            "class_name": item.class_name,
            "source_image": str(item.image),
            "slice_name": "+".join(r.name for r in refs),
            "file_index": refs[0].index,
            # a 3D mask of the structure is its truth on the scan's grid: the prediction is scored against it
            "native": None if truth is None else native_from_mask(truth, raw.affine, frame_to_world),
            "scored_against": "request mask",
        }

    def _inputs(self, i: int, raw: nib.Nifti1Image) -> Sample:
        """Request ``i``'s model inputs: its slices resampled like a split's, in the frame they place."""
        item, refs = self.items[i], self.slices[i]
        classes, in_memory = self._view_labels(i, raw)
        volume = load_volume(item.image, classes, self.prep, in_memory)
        indices = [r.grid_index for r in refs]
        side_mm = self.frame_scale * self.extent_mm[item.class_name]
        others = [(r.axis, index) for r, index in zip(refs[1:], indices[1:], strict=True)]
        centre = (
            seen_centre(volume.labels, list(range(1, len(refs))), others, refs[0].axis, indices[0])
            if others
            else None
        )
        first, _ = slice_frame(
            volume.labels, 0, volume.affine, volume.spacing_mm, refs[0].axis, indices[0], side_mm
        )
        frame = recentred(first, refs[0].axis, centre)
        planes = [(r.axis, index, k) for k, (r, index) in enumerate(zip(refs, indices, strict=True))]
        sample = slice_sample(volume.image, volume.labels, frame, planes, self.slice_size, self.max_views)
        inside = views_inside(sample, frame, volume.image.shape)
        tissue = self._check_tissue(i, sample, side_mm, inside)
        if self.reads_scan(i):
            context = sample_context(frame, volume.image, self.context_cells, raw.affine, raw.shape)
            sample["context"] = torch.from_numpy(context)
        if self.reading == "relative":
            relative_sample(sample, tissue, inside)
        self._warn_at_edge(i, sample, side_mm)
        return sample

    def _check_tissue(self, i: int, sample: Sample, side_mm: float, inside: np.ndarray) -> Tissue | None:
        """The tissue under the drawn masks (`marked_tissue`; None, with a warning naming the request,
        when the masks are too small for statistics), checked against what the model saw of the
        class in training (`tissue_mismatch`): a warning naming the request, or an error with
        ``intensity_check: error``."""
        images, masks = drawn_views(sample)
        item = self.items[i]
        tissue = marked_tissue(images, masks, side_mm / masks.shape[-1], inside)
        trained = self.tissue.get(item.class_name)
        if tissue is None and (trained is not None or self.reading == "relative"):
            warnings.warn(
                f"predict item {i + 1} ({item.class_name} in {item.image}, {'+'.join(r.name for r in self.slices[i])}): "
                "its drawn masks are too small (or fill their slices) for statistics of the marked tissue: "
                "not compared with the training scans, and a relative reading of the scan reads neutral",
                stacklevel=2,
            )
        # a relative reader sees no absolute unit: only a model that reads them is warned of them
        absolute = self.reading == "absolute"
        why = None if tissue is None or trained is None or not absolute else tissue_mismatch(tissue, trained)
        if why is None:
            return tissue
        message = (
            f"predict item {i + 1} ({item.class_name} in {item.image}): {why}; is the scan another modality "
            "or rescaled, its contrast inverted, or the mask drawn on another scan?"
        )
        if self.intensity_check == "error":
            raise DataError(f"{message} (data.predict.intensity_check: error refuses it; warn only warns)")
        warnings.warn(message, stacklevel=2)
        return tissue

    def _warn_at_edge(self, i: int, sample: Sample, side_mm: float) -> None:
        """A drawn mask that reaches the frame's edge is cut there: the structure is larger than
        the frame its class was trained with, and its surface past the edge cannot be reconstructed."""
        masks = drawn_views(sample)[1].astype(bool)
        edge = masks[:, [0, -1], :].any(axis=(1, 2)) | masks[:, :, [0, -1]].any(axis=(1, 2))
        if not edge.any():
            return
        refs, pixel_mm = self.slices[i], side_mm / masks.shape[-1]
        names = [refs[k].name for k in np.flatnonzero(edge) if k < len(refs)]
        rows, cols = np.flatnonzero(masks.any(axis=(0, 2))), np.flatnonzero(masks.any(axis=(0, 1)))
        span = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) * pixel_mm
        item = self.items[i]
        warnings.warn(
            f"predict item {i + 1} ({item.class_name} in {item.image}): the mask of {', '.join(names)} reaches "
            f"the edge of the {side_mm:.0f} mm frame of {item.class_name} (at least {span:.0f} mm of it is "
            "inside): the structure is larger than the frame the model was trained with, and its surface "
            "past the edge is cut; give data.frame.extent_mm a larger extent for this class, or a model "
            "trained on larger frames",
            stacklevel=2,
        )

    @property
    def max_views(self) -> int:
        """The most views any request has (`collate` pads each batch to its own most)."""
        return max((len(refs) for refs in self.slices), default=1)

    def _view_labels(
        self, i: int, raw: nib.Nifti1Image
    ) -> tuple[dict[int, tuple[Path, None]], dict[Path, nib.Nifti1Image]]:
        """Request ``i``'s slice masks as label volumes in the file's orientation, view k as class bit k,
        for `load_volume`. Each mask is repeated on the file slices around its model grid slice's plane
        (`file_slices_read`), so the nearest-neighbour resampling cannot miss it."""
        classes, images = {}, {}
        grid = self.grids[i]
        for k, (ref, mask) in enumerate(zip(self.slices[i], self.masks[i], strict=True)):
            labels = np.zeros(raw.shape, dtype=np.uint8)
            for j in file_slices_read(ref, raw, grid):
                take: list[Any] = [slice(None)] * 3
                take[ref.file_axis] = j
                labels[tuple(take)] = mask
            key = Path(f"<view {k + 1} of request {i + 1}>")
            classes[k], images[key] = (key, None), nib.Nifti1Image(labels, raw.affine)
        return classes, images
