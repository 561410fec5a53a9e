"""Reading NIfTI files with one-line errors: open and check a file (`open_nifti`, `load_nifti`),
its canonical RAS grid (`canonical_grid`), its array (`read_array`), and the check that a mask
lies on its scan's grid (`check_same_grid`)."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = [
    "Box",
    "DataError",
    "affine_difference",
    "canonical_grid",
    "check_same_grid",
    "load_nifti",
    "open_nifti",
    "read_array",
]

Box = tuple[list[int], list[int]]
"""(low, high) voxel corners of a box on a grid, high exclusive."""


class DataError(ValueError):
    """Bad input data; the message names the file and what was expected."""


def open_nifti(path: str | Path, what: str = "image") -> nib.Nifti1Image:
    """Open a 3D NIfTI and check its header (3D, a usable affine), in the file's own orientation;
    no voxel is read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")
    try:
        img = nib.load(str(path))
    except Exception as err:
        raise DataError(f"{what} file {path} is not a readable NIfTI file: {err}") from err
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
        shape = img.shape
    if len(shape) != 3:
        raise DataError(f"{what} file {path} has shape {shape}: expected a 3D volume")
    affine = img.affine
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DataError(f"{what} file {path} has a non-invertible or non-finite affine:\n{affine}")
    return img


def load_nifti(path: str | Path, what: str = "image") -> nib.Nifti1Image:
    """Read a 3D NIfTI, check it, and return it in the closest canonical (RAS) orientation."""
    img = open_nifti(path, what)
    try:  # reorienting reads the voxels when the axes must change
        return nib.as_closest_canonical(img)
    except Exception as err:
        raise DataError(f"{what} file {path} cannot be read (truncated or corrupt?): {err}") from err


def canonical_grid(img: nib.Nifti1Image) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine) of ``img`` in the closest canonical orientation, from its header alone (what
    ``nib.as_closest_canonical`` gives without reading the voxels)."""
    ornt = nib.orientations.io_orientation(img.affine)
    shape = tuple(int(img.shape[int(a)]) for a in np.argsort(ornt[:, 0]))
    return shape, img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape)


def read_array(
    img: nib.Nifti1Image, path: str | Path, what: str, dtype: type | None = np.float32
) -> np.ndarray:
    """The voxel data (``dtype`` None: as stored, or float when the header scales it), with
    truncated or corrupt files reported by name."""
    try:
        data = np.asarray(img.dataobj, dtype=dtype)
    except Exception as err:  # EOFError, zlib.error, OSError on truncated/corrupt .nii.gz
        raise DataError(f"{what} file {path} cannot be read (truncated or corrupt?): {err}") from err
    return data


def check_same_grid(
    grid: tuple[tuple[int, ...], np.ndarray], label: nib.Nifti1Image, image_path: Path, label_path: Path
) -> None:
    """``label`` (canonical) lies on the image's canonical ``grid`` (shape, affine)."""
    shape, affine = grid
    if tuple(shape) != tuple(label.shape):
        raise DataError(
            f"label {label_path} has shape {label.shape} but image {image_path} has {tuple(shape)}"
        )
    if not np.allclose(affine, label.affine, atol=1e-3):
        raise DataError(
            f"label {label_path} and image {image_path} lie on different grids: {affine_difference(label.affine, affine)}"
        )


def affine_difference(a: np.ndarray, b: np.ndarray) -> str:
    """Two voxel -> world affines' difference in one line: how far apart (mm) the grids put the same
    voxel, at the worst corner of a 512-voxel cube; both matrices go to the debug log."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    logging.getLogger("lora_sam3d").debug("affine\n%s\nvs\n%s", np.round(a, 4), np.round(b, 4))
    corners = np.array([[i, j, k, 1.0] for i in (0, 511) for j in (0, 511) for k in (0, 511)])
    moved = np.linalg.norm((corners @ (a - b).T)[:, :3], axis=1)
    origin = float(np.linalg.norm(a[:3, 3] - b[:3, 3]))
    return (
        f"the same voxel lies up to {moved.max():.3g} mm apart (origins {origin:.3g} mm apart; voxel sizes "
        f"{_sizes(a)} vs {_sizes(b)} mm)"
    )


def _sizes(affine: np.ndarray) -> str:
    return " x ".join(f"{v:.3g}" for v in np.linalg.norm(affine[:3, :3], axis=0))
