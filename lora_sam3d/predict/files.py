"""Files a user opens beside the meshes (`lora_sam3d.geometry.Mesh.save`): a NIfTI mask on the source
scan's grid and PNG previews.

Every file is written to a temporary name and renamed, so an interrupted run leaves no
half-written file under a final name. Meshes carry their coordinate system in the header
(``SPACE=RAS`` or ``SPACE=LPS``, the convention 3D Slicer reads; Slicer assumes LPS otherwise).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from lora_sam3d.geometry import BoxMask, sdf_on_grid
from lora_sam3d.io.atomic import atomic_write

__all__ = ["mask_on_source_grid", "preview_png", "write_nifti"]


def mask_on_source_grid(
    sdf: np.ndarray, frame_to_world: np.ndarray, source_image: str | Path, scored: BoxMask | None = None
) -> nib.Nifti1Image:
    """The predicted inside (SDF < 0) resampled onto the source scan's own voxel grid, uint8.

    Only the header of the source is read (shape, affine, its qform and sform codes, kept); see
    `sdf_on_grid`. ``scored``: the
    prediction as it was scored (`Prediction.on_scan`); when it lies on the scan's grid it is the
    mask (computed once per request), else the mask is voxelised here.
    """
    src = nib.load(str(source_image))
    shape, affine = src.shape[:3], src.affine
    if scored is not None and scored.on(affine, shape):
        out = scored.full(np.uint8)
    else:
        out = sdf_on_grid(sdf, frame_to_world, affine, shape).astype(np.uint8)
    img = nib.Nifti1Image(out, affine)
    # the scan's own codes (scanner, aligned, MNI...): a viewer places the mask as it places the scan
    header = src.header
    img.set_qform(src.get_qform(), code=int(header.get("qform_code", 1)))
    img.set_sform(src.get_sform(), code=int(header.get("sform_code", 1)))
    return img


def write_nifti(img: nib.Nifti1Image, path: Path) -> Path:
    return atomic_write(path, lambda tmp: nib.save(img, str(tmp)))


def _plane(volume: np.ndarray, axis: int) -> np.ndarray:
    take: list[slice | int] = [slice(None)] * 3
    take[axis] = volume.shape[axis] // 2
    return volume[tuple(take)]


def preview_png(
    image: np.ndarray,
    mask: np.ndarray,
    sdf: np.ndarray,
    axis: int,
    gt_sdf: np.ndarray | None,
    path: Path,
    title: str,
) -> Path:
    """Three panels: the input slice with its mask (red outline), then the two orthogonal planes through
    the frame's centre with the prediction (red) and ground truth (green; overlap yellow)."""
    from PIL import Image, ImageDraw

    size = 192

    def to_rgb(a: np.ndarray) -> np.ndarray:
        return np.repeat((np.clip(a, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=-1)

    slice_rgb = to_rgb(image)
    edge = mask & ~ndimage.binary_erosion(mask)
    slice_rgb[edge] = [255, 40, 40]
    panels = [slice_rgb]
    for other in (a for a in range(3) if a != axis):
        pred = _plane(sdf, other) < 0
        rgb = np.zeros((*pred.shape, 3), dtype=np.uint8)
        rgb[..., 0] = pred * 230
        if gt_sdf is not None:
            rgb[..., 1] = (_plane(gt_sdf, other) < 0) * 200
        panels.append(rgb)
    tiles = [
        Image.fromarray(np.ascontiguousarray(np.rot90(p))).resize((size, size), Image.NEAREST) for p in panels
    ]
    canvas = Image.new("RGB", (size * 3, size + 18), (20, 20, 20))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (i * size, 18))
    ImageDraw.Draw(canvas).text((4, 3), title, fill=(230, 230, 230))
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
