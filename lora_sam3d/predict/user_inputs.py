"""Scans and drawings as users hold them: NIfTI files, DICOM series folders, nibabel images, arrays
with their affine; masks as files, images, 3D arrays on the scan's grid or a 2D array of one slice;
a drawing as a viewer's labels layer holds it (a 3D label array), whose slices are found here.

Everything becomes a `nibabel.Nifti1Image` on the scan's own voxels, which `lora_sam3d.reconstruct`
hands to the request pipeline. DICOM is read by SimpleITK (its geometry: LPS, turned to nibabel's
RAS), never by hand. A mask stored on the same voxels with its axes in another order or flipped (a
label map written by another tool than the one that read the series) is put in the scan's order
with nibabel's orientation tools. Written here: finding the drawn slices in a label array (the
fewest file slices holding every painted voxel), which no library does.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from lora_sam3d.data.nifti import DataError, open_nifti
from lora_sam3d.data.requests.items import AXIS_NAMES, file_axis, locate_slice, parse_axis
from lora_sam3d.data.requests.masks import drawn_extent_mm
from lora_sam3d.data.requests.names import case_name

__all__ = [
    "Scan",
    "drawing_extent_mm",
    "drawn_slices",
    "read_dicom_series",
    "read_mask",
    "read_scan",
    "scan_file",
]

Scan = str | Path | nib.Nifti1Image | tuple[np.ndarray, np.ndarray]
"""A scan as `reconstruct` takes it: a NIfTI path, a DICOM series folder, an image, or (array, RAS affine)."""


def read_scan(scan: Any) -> tuple[nib.Nifti1Image, str]:
    """The scan as a 3D image and a name for its outputs."""
    if isinstance(scan, tuple):
        if len(scan) != 2:
            raise DataError(f"scan given as a tuple of {len(scan)}: expected (array, affine)")
        array, affine = np.asarray(scan[0]), np.asarray(scan[1], dtype=float)
        if array.ndim != 3 or affine.shape != (4, 4):
            raise DataError(
                f"scan (array, affine): expected a 3D array and a 4x4 affine, got {array.shape} and {affine.shape}"
            )
        return nib.Nifti1Image(array, affine), "scan"
    if isinstance(scan, nib.spatialimages.SpatialImage):
        name = case_name(scan.get_filename()) if scan.get_filename() else "scan"
        return nib.Nifti1Image(np.asanyarray(scan.dataobj), scan.affine, getattr(scan, "header", None)), name
    if not isinstance(scan, str | Path):
        raise TypeError(
            f"scan: expected a path, a DICOM folder, a nibabel image or (array, affine), got {type(scan)}"
        )
    path = Path(scan)
    if path.is_dir():
        return read_dicom_series(path), path.name
    return open_nifti(path, "image"), case_name(path)  # its voxels read when needed, once


def scan_file(scan: Any, image: nib.Nifti1Image, name: str, folder: str | Path) -> str:
    """The path the request pipeline reads ``scan`` from: the user's own file where it is a NIfTI
    file, else an uncompressed copy of ``image`` in ``folder`` (mapped, not decoded, on every read),
    named as the scan so outputs are."""
    if isinstance(scan, str | Path) and Path(scan).is_file():
        return str(scan)
    path = Path(folder) / name / f"{name}.nii"
    path.parent.mkdir()
    nib.save(image, path)
    return str(path)


def read_dicom_series(folder: Path) -> nib.Nifti1Image:
    """The one DICOM series in ``folder`` as an image with nibabel's RAS affine (SimpleITK reads it)."""
    try:
        import SimpleITK as sitk
    except ImportError as err:
        raise DataError(
            f"{folder} is a folder: reading a DICOM series needs SimpleITK (pip install 'lora-sam3d[dicom]')"
        ) from err
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise DataError(f"{folder} holds no DICOM series (expected a folder of one series' .dcm files)")
    if len(series) > 1:
        raise DataError(
            f"{folder} holds {len(series)} DICOM series ({', '.join(series)}): give a folder of one"
        )
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    image = reader.Execute()
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # SimpleITK's (z, y, x) -> voxel (i, j, k)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return nib.Nifti1Image(np.ascontiguousarray(array), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)


def _on_scan_voxels(mask: nib.Nifti1Image, scan: nib.Nifti1Image) -> nib.Nifti1Image:
    """``mask`` in the scan's voxel order when it describes the same voxels with its axes permuted or
    flipped; otherwise unchanged (the request pipeline refuses another grid, saying how far it is)."""
    if mask.shape == scan.shape and np.allclose(mask.affine, scan.affine, atol=1e-3):
        return mask
    transform = nib.orientations.ornt_transform(
        nib.io_orientation(mask.affine), nib.io_orientation(scan.affine)
    )
    data = nib.orientations.apply_orientation(np.asanyarray(mask.dataobj), transform)
    affine = mask.affine @ nib.orientations.inv_ornt_aff(transform, mask.shape)
    spacing = float(np.linalg.norm(scan.affine[:3, :3], axis=0).min())
    if data.shape == scan.shape and np.allclose(affine, scan.affine, atol=1e-3 * spacing):
        return nib.Nifti1Image(np.ascontiguousarray(data), scan.affine)
    return mask


def read_mask(
    mask: Any,
    scan: nib.Nifti1Image,
    axis: str | int = "axial",
    index: int | None = None,
    position_mm: float | None = None,
) -> nib.Nifti1Image:
    """A mask as a 3D image on the scan's voxels: a path or image (reordered when stored on the same
    voxels in another axis order), a 3D array of the scan's shape, or a 2D array of the slice
    ``axis`` / ``index`` (or ``position_mm``). None for a path to a slice's own file (a 2D NIfTI, a
    PNG), which the request pipeline reads as it is."""
    if isinstance(mask, str | Path):
        path = Path(mask)
        if not path.is_file():
            raise DataError(f"mask {path} does not exist")
        if not path.name.lower().endswith((".nii", ".nii.gz")) or len(nib.load(str(path)).shape) != 3:
            return None  # a PNG or a 2D NIfTI of the slice: the request pipeline reads it as it is
        return _on_scan_voxels(open_nifti(path, "mask"), scan)
    if isinstance(mask, nib.spatialimages.SpatialImage):
        return _on_scan_voxels(nib.Nifti1Image(np.asanyarray(mask.dataobj), mask.affine), scan)
    array = np.asarray(mask)
    if array.dtype == bool:  # NIfTI has no bool: a viewer's or numpy's mask as 0/1
        array = array.astype(np.uint8)
    if array.ndim == 3:
        if array.shape != scan.shape:
            raise DataError(
                f"mask array of shape {array.shape} on a scan of shape {scan.shape}: expected the scan's shape"
            )
        return nib.Nifti1Image(array, scan.affine)
    if array.ndim != 2:
        raise DataError(f"mask array of shape {array.shape}: expected 3D (the scan's grid) or 2D (one slice)")
    ref = locate_slice(scan, parse_axis(axis), index, position_mm)
    want = tuple(n for a, n in enumerate(scan.shape) if a != ref.file_axis)
    if array.shape != want:
        raise DataError(f"2D mask of shape {array.shape} for {ref.name}: that slice is {want} voxels")
    volume = np.zeros(scan.shape, dtype=array.dtype)
    take: list[Any] = [slice(None)] * 3
    take[ref.file_axis] = ref.index
    volume[tuple(take)] = array
    return nib.Nifti1Image(volume, scan.affine)


def drawn_slices(paint: np.ndarray, affine: np.ndarray) -> list[dict[str, Any]]:
    """The fewest file slices, along any axis, that hold every painted voxel of a label array, as
    request slices (``{"axis": "axial", "index": 16}``, named by the world axis each file axis runs
    along). Chosen greedily, the slice holding most of the paint not yet covered first. Paint that
    needs neighbouring parallel slices (a 3D brush stroke) is refused, saying where it is."""
    spans = [np.flatnonzero(paint.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
    if any(span.size == 0 for span in spans):
        raise DataError("the drawing has no painted voxel")
    lo = np.array([span[0] for span in spans])
    box = paint[tuple(slice(span[0], span[-1] + 1) for span in spans)]
    left = np.argwhere(box) + lo  # found in the paint's box: a drawing is a small part of a scan
    chosen: list[tuple[int, int]] = []
    while left.size:
        counts = [np.unique(left[:, a], return_counts=True) for a in range(3)]
        most = max(int(c[1].max()) for c in counts)
        ties = [(a, int(v)) for a in range(3) for v, n in zip(*counts[a], strict=True) if n == most]
        # of equal slices, one beside no chosen parallel slice (thin paint lies in several slices' planes)
        axis, value = min(ties, key=lambda t: any(a == t[0] and abs(v - t[1]) == 1 for a, v in chosen))
        chosen.append((axis, value))
        left = left[left[:, axis] != value]
    ornt = nib.io_orientation(affine)
    for axis in range(3):
        along = sorted(v for a, v in chosen if a == axis)
        near = [(a, b) for a, b in itertools.pairwise(along) if b - a == 1]
        if near:
            lo, hi = near[0][0], near[0][1]
            pieces, _ = ndimage.label(paint, structure=np.ones((3, 3, 3)))
            first = np.argwhere(np.take(pieces, lo, axis=axis))[0]
            voxel = [*list(first[:axis]), lo, *list(first[axis:])]
            where = np.argwhere(pieces == pieces[tuple(voxel)])  # the stroke, whole
            box = ", ".join(f"{'ijk'[a]} {where[:, a].min()}..{where[:, a].max()}" for a in range(3))
            raise DataError(
                f"the paint at voxels {box} spans neighbouring {AXIS_NAMES[int(ornt[axis, 0])]} slices "
                f"{lo} and {hi} and several slices along every axis (a 3D brush stroke?): draw on separate slices"
            )
    return [{"axis": AXIS_NAMES[int(ornt[a, 0])], "index": v} for a, v in sorted(chosen)]


def drawing_extent_mm(mask: nib.Nifti1Image, slices: Sequence[dict[str, Any]]) -> float:
    """A frame extent from the drawing itself (for a structure the model has none for): the largest
    side, in mm, of the drawn masks' boxes on their slices (`drawn_extent_mm`). Several slices
    together measure the structure in 3D; one slice measures it in-plane, and the structure is
    taken to be as deep as it is wide there."""
    data = np.asanyarray(mask.dataobj)
    planes = []
    for s in slices:
        along = file_axis(mask.affine, s["axis"])
        planes.append((along, int(s["index"]), np.take(data, int(s["index"]), axis=along)))
    extent = drawn_extent_mm(planes, np.linalg.norm(mask.affine[:3, :3], axis=0))
    if not extent:
        raise DataError("the drawing has no painted voxel on its slices")
    return extent
