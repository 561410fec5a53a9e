"""The prediction on a scan's own grid: voxelised once, only where the frame is, and scored on a box.

A real CT is 512 x 512 x 300 voxels or more; the structure and its frame fill a small box of it. The
mask is computed on that box (scipy's affine transform, no coordinate arrays), the scores are taken
on the box that holds both masks, and the mask a request writes is the mask it scored.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lora_sam3d.geometry import BoxMask, frame_box, sdf_on_grid
from lora_sam3d.metrics import sample_metrics


def by_coordinates(
    sdf: np.ndarray, frame_to_world: np.ndarray, affine: np.ndarray, shape: tuple
) -> np.ndarray:
    """The voxelisation written the plain way: every voxel centre of the frame's box mapped into the
    frame and the SDF read there (the oracle)."""
    out = np.zeros(shape, dtype=bool)
    lo, hi = frame_box(frame_to_world, affine, shape)
    if np.any(hi <= lo):
        return out
    ijk = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1)
    to_frame = np.linalg.inv(frame_to_world) @ affine
    u = ijk @ to_frame[:3, :3].T + to_frame[:3, 3]
    n = sdf.shape[0] - 1
    values = ndimage.map_coordinates(
        sdf, ((u + 0.5) * n).reshape(-1, 3).T, order=1, mode="constant", cval=1.0
    )
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = values.reshape(ijk.shape[:3]) < 0
    return out


def ellipsoid_sdf(n: int, radii: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    g = np.linspace(-0.5, 0.5, n + 1)
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    shape = np.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2) - 1
    return (shape * min(radii) + 0.005 * rng.standard_normal(shape.shape)).astype(np.float32)


def rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("axes", ["along the frame", "oblique"])
def test_the_mask_on_a_scan_grid_equals_the_voxel_by_voxel_reading(seed: int, axes: str) -> None:
    """Frames on anisotropic, flipped, permuted or oblique scan grids, a structure cut by the frame
    (seed 2) and frames cut by the scan's edge: the same voxels as reading the SDF at every voxel
    centre (grids along the frame are read axis by axis, oblique ones by scipy's transform)."""
    rng = np.random.default_rng(seed)
    sdf = ellipsoid_sdf(32, (0.6 if seed == 2 else 0.35, 0.25, 0.3), rng)
    turn = rotation(rng) if axes == "oblique" else np.eye(3)[rng.permutation(3)] * rng.choice([-1, 1], 3)
    frame_to_world = np.eye(4)
    frame_to_world[:3, :3] = turn * rng.uniform(40, 80)
    frame_to_world[:3, 3] = rng.uniform(-20, 20, 3)
    affine = np.diag([*rng.choice([-1, 1], 3) * rng.uniform(0.6, 2.5, 3), 1.0])
    shape = (90, 80, 40 + 20 * seed)  # the last grid cuts the frame less than the first
    affine[:3, 3] = -affine[:3, :3] @ (np.asarray(shape) / 2) + rng.uniform(-15, 15, 3)
    want = by_coordinates(sdf, frame_to_world, affine, shape)
    got = sdf_on_grid(sdf, frame_to_world, affine, shape)
    assert want.any() and not want.all()
    assert np.array_equal(got, want), int((got != want).sum())


@pytest.mark.parametrize(
    "case",
    ["overlapping", "shifted", "touching the grid's edge", "prediction inside the truth"],
)
def test_scores_on_the_box_equal_scores_on_the_whole_grid(case: str) -> None:
    """Dice, IoU, HD95, ASSD and NSD of two masks held on a box of a large grid equal those of the
    same masks on the whole grid (to 1e-6): the distances only see the surfaces."""
    shape, spacing = (160, 150, 90), (0.4, 0.5, 1.2)
    idx = np.indices(shape, dtype=np.float32)

    def ball(centre: tuple[float, float, float], radius: float) -> np.ndarray:
        d = sum(((idx[a] - centre[a]) * spacing[a]) ** 2 for a in range(3))
        return d <= radius**2

    truth = ball((80, 75, 45), 14.0)
    pred = {
        "overlapping": ball((82, 74, 46), 13.0),
        "shifted": ball((90, 80, 47), 12.0),
        "touching the grid's edge": ball((150, 75, 45), 14.0),
        "prediction inside the truth": ball((80, 75, 45), 9.0),
    }[case]
    if case == "touching the grid's edge":
        truth = ball((152, 74, 44), 15.0)
    whole = sample_metrics(pred, truth, spacing)
    nz = np.argwhere(pred | truth)
    lo, hi = np.maximum(nz.min(0) - 1, 0), np.minimum(nz.max(0) + 2, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    assert np.prod(hi - lo) < 0.5 * np.prod(shape), "the box is a small part of the grid"
    on_box = sample_metrics(pred[box], truth[box], spacing)
    assert on_box.keys() == whole.keys()
    for key in whole:
        assert on_box[key] == pytest.approx(whole[key], abs=1e-6), key
    held = BoxMask(pred[box], lo, shape, np.eye(4))
    assert np.array_equal(held.full(), pred) and held.on(np.eye(4), shape)


def test_a_request_writes_the_mask_it_scored(phantoms: Path) -> None:
    """`reconstruct` with the structure's 3D mask: the Dice it reports is the Dice of the mask it gives
    back (on the scan's grid) against that mask; the prediction was voxelised once, on a box, and
    the drawn slice holds the drawing."""
    from lora_sam3d import reconstruct
    from lora_sam3d.metrics import overlap
    from lora_sam3d.models import Reconstructor

    model = Reconstructor.from_adapter(Path(__file__).parent / "data" / "previous_main" / "adapter")
    case = phantoms / "s0001"
    mask = case / "segmentations" / "heart_ventricle_left.nii.gz"
    result = reconstruct(model, case / "ct.nii.gz", mask, "heart_ventricle_left", index=16)
    truth = np.asarray(nib.load(str(mask)).dataobj) > 0
    written = np.asarray(result.mask.dataobj) > 0
    held = result.prediction.on_scan
    scan = nib.load(str(case / "ct.nii.gz"))
    assert held is not None and held.on(scan.affine, scan.shape), "held on a box of the scan's own grid"
    assert written.shape == truth.shape and written.any()
    assert result.prediction.metrics is not None
    assert overlap(written, truth)[0] == pytest.approx(result.prediction.metrics["dice"], abs=1e-12)
    again = sdf_on_grid(result.prediction.sdf, result.prediction.frame_to_world, scan.affine, scan.shape)
    again[:, :, 16] = truth[:, :, 16]  # the drawn slice is the drawing
    assert np.array_equal(again, written), "the box holds the whole prediction"
