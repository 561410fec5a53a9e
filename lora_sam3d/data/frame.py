"""Steps 3-4 of the data flow: the reconstruction cube from one slice and its mask, and targets in it.

The frame is placed from the input slice and mask only, never from the 3D ground truth (which does
not exist at inference): in-plane centre = mask centroid, out-of-plane centre = the slice's
position, side = a per-class physical extent (a training-split statistic, or given). Its axes are
the voxel axes of the canonical, isotropic grid, so ``frame_to_world`` = grid affine @ (scale
by the side in voxels, translate to the centre). Normalised frame coordinates u lie in
[-0.5, 0.5]^3; the decoder's vertex grid (4R+1)^3 sits at ``u = i / 4R - 0.5`` and its cells
(4R)^3 at ``u = (i + 0.5) / 4R - 0.5``. Sampling uses scipy.ndimage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lora_sam3d.data.nifti import DataError
from lora_sam3d.inputs import CONTEXT_CHANNELS

__all__ = [
    "Frame",
    "make_frame",
    "plane_axes",
    "sample_context",
    "sample_occupancy",
    "sample_sdf",
    "sample_slice",
]


def plane_axes(axis: int) -> tuple[int, int]:
    """The two voxel axes spanning a slice normal to ``axis`` (in increasing order)."""
    if axis not in (0, 1, 2):
        raise DataError(f"slice axis must be 0 (sagittal), 1 (coronal) or 2 (axial), got {axis!r}")
    p, q = (a for a in range(3) if a != axis)
    return p, q


@dataclass(frozen=True)
class Frame:
    """A cube in the voxel grid: centre (voxel coordinates, float) and side (voxels)."""

    centre_vox: tuple[float, float, float]
    side_vox: float
    grid_affine: np.ndarray  # (4, 4) voxel -> world mm of the canonical isotropic grid

    @property
    def frame_to_voxel(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] *= self.side_vox
        m[:3, 3] = self.centre_vox
        return m

    @property
    def frame_to_world(self) -> np.ndarray:
        """(4, 4): normalised frame coordinates [-0.5, 0.5]^3 -> world RAS mm."""
        return self.grid_affine @ self.frame_to_voxel

    def to_voxel(self, u: np.ndarray) -> np.ndarray:
        """(..., 3) frame coordinates -> voxel coordinates."""
        return np.asarray(self.centre_vox) + self.side_vox * u


def make_frame(
    mask2d: np.ndarray, axis: int, index: int, side_mm: float, spacing_mm: float, grid_affine: np.ndarray
) -> Frame:
    """The frame for a slice: ``mask2d`` is the class mask on that slice (plane axes in order)."""
    pts = np.argwhere(mask2d)
    if len(pts) == 0:
        raise DataError(f"the mask on slice axis={axis} index={index} is empty: cannot place a frame")
    p, q = plane_axes(axis)
    centre = [0.0, 0.0, 0.0]
    centre[axis] = float(index)
    centre[p], centre[q] = (float(v) for v in pts.mean(axis=0))
    return Frame(tuple(centre), side_mm / spacing_mm, np.asarray(grid_affine, dtype=np.float64))  # type: ignore[arg-type]


def _sample_grid(
    frame: Frame, volume: np.ndarray, origin: np.ndarray, n: int, cells: bool, order: int, cval: float
) -> np.ndarray:
    """Sample ``volume`` (whose voxel 0 sits at grid voxel ``origin``) on the frame's n^3 grid.

    The frame is axis-aligned with the voxel grid, so this is a diagonal affine resampling
    (scipy.ndimage.affine_transform), cheaper than interpolating at a list of points.
    """
    u0 = (0.5 / n - 0.5) if cells else -0.5
    step = (1.0 / n) if cells else 1.0 / (n - 1)
    start = frame.to_voxel(np.full(3, u0)) - origin
    return ndimage.affine_transform(
        np.asarray(volume, dtype=np.float32),
        np.full(3, frame.side_vox * step),
        offset=start,
        output_shape=(n, n, n),
        order=order,
        mode="constant",
        cval=cval,
    )


def sample_sdf(
    frame: Frame, sdf_crop: np.ndarray, crop_origin: np.ndarray, n: int, truncation_mm: float, side_mm: float
) -> np.ndarray:
    """(n, n, n) float32 SDF at the frame's vertex grid, in frame units (mm / side), truncated.

    Trilinear in the stored (already truncated) SDF; points outside the stored crop are outside
    the structure by at least the truncation.
    """
    values = _sample_grid(frame, sdf_crop, crop_origin, n, cells=False, order=1, cval=truncation_mm)
    return (np.clip(values, -truncation_mm, truncation_mm) / side_mm).astype(np.float32)


def sample_occupancy(frame: Frame, sdf_crop: np.ndarray, crop_origin: np.ndarray, n: int) -> np.ndarray:
    """(n, n, n) bool: is the nearest voxel to each cell centre inside the structure."""
    return _sample_grid(frame, sdf_crop, crop_origin, n, cells=True, order=0, cval=1.0) < 0


def sample_context(
    frame: Frame, image: np.ndarray, n: int, scan_affine: np.ndarray, scan_shape: tuple[int, ...]
) -> np.ndarray:
    """(2, n, n, n) float32: the scan read at the centres of the frame's n^3 cells (trilinear on the
    canonical grid) and whether each centre lies inside the scan (its voxel box on the file's own
    grid: ``scan_affine``, ``scan_shape``). Outside the scan both channels are 0, so a frame that
    reaches past the volume's edge reads "no scan" there, never tissue of intensity 0.

    ``image`` is the whole canonical volume (an array or the cache's `CroppedArray`, of which only
    the box the frame covers is read).
    """
    u = (np.arange(n) + 0.5) / n - 0.5
    centres = [frame.centre_vox[a] + frame.side_vox * u for a in range(3)]  # voxel coordinate per axis
    out = np.zeros((CONTEXT_CHANNELS, n, n, n), dtype=np.float32)
    out[1] = _inside(frame, u, scan_affine, scan_shape)
    lo = [max(0, int(np.floor(c[0])) - 1) for c in centres]
    hi = [min(s, int(np.ceil(c[-1])) + 2) for c, s in zip(centres, image.shape, strict=True)]
    if any(a >= b for a, b in zip(lo, hi, strict=True)) or not out[1].any():
        out[1] = 0.0
        return out
    box = np.asarray(image[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], dtype=np.float32)
    start = frame.to_voxel(np.full(3, u[0])) - np.asarray(lo)
    out[0] = ndimage.affine_transform(
        box, np.full(3, frame.side_vox / n), offset=start, output_shape=(n, n, n), order=1, mode="nearest"
    )
    out[0] *= out[1]
    return out


def _inside(frame: Frame, u: np.ndarray, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(n, n, n) float32, 1 where the frame's cell centre (coordinates ``u`` per axis) lies in the voxel
    box [-0.5, N - 0.5] of the grid (``affine``, ``shape``). Each of the grid's voxel coordinates is
    affine in the three frame coordinates, so it is built by broadcasting three (n,) vectors, never
    as an (n^3, 3) array of points (the frame may lie obliquely in the scan)."""
    to_scan = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ frame.frame_to_world
    inside = np.ones((len(u),) * 3, dtype=bool)
    for d in range(3):
        a = to_scan[d, :3]
        vox = (
            (a[0] * u)[:, None, None] + (a[1] * u)[None, :, None] + (a[2] * u)[None, None, :] + to_scan[d, 3]
        )
        inside &= (vox >= -0.5) & (vox <= shape[d] - 0.5)
    return inside.astype(np.float32)


def sample_slice(frame: Frame, plane: np.ndarray, axis: int, size: int, order: int) -> np.ndarray:
    """(size, size) resampling of a 2D slice (plane axes in order) over the frame's central square."""
    u = (np.arange(size) + 0.5) / size - 0.5
    p, q = plane_axes(axis)
    cp = frame.centre_vox[p] + frame.side_vox * u
    cq = frame.centre_vox[q] + frame.side_vox * u
    coords = np.stack(np.meshgrid(cp, cq, indexing="ij"), axis=0)
    return ndimage.map_coordinates(
        np.asarray(plane, dtype=np.float32), coords, order=order, mode="constant", cval=0.0
    )
