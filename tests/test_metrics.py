"""The metrics' rules (MONAI values, per-axis spacing, empty masks) and scoring on the scan's own grid."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_settings

from lora_sam3d.data import TS_SAM3D_Dataset, write_phantoms
from lora_sam3d.geometry import mask_surface, sdf_on_grid
from lora_sam3d.metrics import MeshMetrics, chamfer_mm, overlap, sample_metrics, surface_distances


def test_scores_on_the_scan_grid_do_not_depend_on_resolution(tmp_path: Path) -> None:
    """The true SDF of the frame, scored as a prediction on the scan's own grid: near-perfect at R=8 and
    R=16 alike, and the two agree (frame-grid numbers would follow the cell size)."""
    root = tmp_path / "data"
    write_phantoms(root, n_cases=3, shape=(48, 48, 32))
    scores = []
    for r in (8, 16):
        ds = TS_SAM3D_Dataset(root, ["heart_ventricle_left"], split="test", slice_sampling_method="central", settings=data_settings(resolution=r, spacing=2.0))  # fmt: skip
        sample = ds[0]
        native = sample["native"]
        assert native["spacing_mm"].round(3).tolist() == [1.6, 1.6, 2.5], "the source file's own spacing"
        pred = sdf_on_grid(sample["gt_sdf"].numpy(), sample["frame_to_world"].numpy(), native["affine"],
                           native["gt"].shape)  # fmt: skip
        truth = mask_surface(native["gt"], native["affine"])
        scores.append(
            sample_metrics(pred, native["gt"], native["spacing_mm"], 3.0, truth.vertices, truth.vertices)
        )
    for values in scores:
        assert values["dice"] > 0.9 and values["hd95_mm"] <= 2.6 and values["nsd"] > 0.95
    assert abs(scores[0]["dice"] - scores[1]["dice"]) < 0.05


def brute_force_surface(
    pred: torch.Tensor, gt: torch.Tensor, spacing: tuple[float, float, float], tol: float
) -> tuple[float, float, float]:
    """HD95, ASSD and NSD from their definitions: border voxels (mask minus its erosion), every
    pairwise distance in mm, no distance transform."""
    from scipy import ndimage

    def border(m: np.ndarray) -> np.ndarray:
        return np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(spacing)

    a, b = border(pred.numpy()), border(gt.numpy())
    d = np.linalg.norm(a[:, None] - b[None], axis=-1)
    to_gt, to_pred = d.min(1), d.min(0)
    both = np.concatenate([to_gt, to_pred])
    hd95 = max(np.percentile(to_gt, 95), np.percentile(to_pred, 95))
    return float(hd95), float(both.mean()), float((both <= tol).mean())


def test_metric_empty_mask_rules_and_monai_values() -> None:
    gt = torch.zeros(20, 20, 20, dtype=torch.bool)
    gt[5:15, 5:15, 5:15] = True
    pred = torch.zeros_like(gt)
    pred[6:15, 5:15, 5:16] = True
    dice, iou = overlap(pred, gt)
    inter = 9 * 10 * 10
    assert dice == pytest.approx(2 * inter / (990 + 1000)) and iou == pytest.approx(
        inter / (990 + 1000 - inter)
    )
    hd95, assd, nsd = surface_distances(pred, gt, 2.0, 3.0)
    assert (hd95, assd, nsd) == pytest.approx(brute_force_surface(pred, gt, (2.0, 2.0, 2.0), 3.0), rel=1e-6)
    assert surface_distances(pred, gt, (2.0, 2.0, 4.0), 3.0) == pytest.approx(
        brute_force_surface(pred, gt, (2.0, 2.0, 4.0), 3.0), rel=1e-6
    ), "per-axis spacing in mm, and NSD's tolerance in mm too"
    assert all(
        math.isnan(v)
        for v in (*overlap(pred, ~torch.ones_like(gt)), *surface_distances(pred, ~torch.ones_like(gt), 1, 3))
    )
    assert surface_distances(torch.zeros_like(gt), gt, 1.0, 3.0) == (math.inf, math.inf, 0.0)

    # per-axis spacing: stretching the grid along one axis stretches distances along it
    assert surface_distances(pred, gt, (2.0, 2.0, 4.0), 3.0)[0] == pytest.approx(4.0)

    metric = MeshMetrics(["a", "b"])
    empty = torch.zeros_like(gt)
    metric.update([sample_metrics(p, g, 2.0) for p, g in ((pred, gt), (empty, gt), (pred, empty))], [0, 0, 1])
    out = metric.compute()
    assert out["dice/a"] == pytest.approx(dice / 2), "empty prediction counts as Dice 0"
    assert out["hd95_mm/a"] == pytest.approx(hd95), "failures are not averaged as infinity"
    assert out["failures/a"] == 1 and out["failures/b"] == 0
    assert math.isnan(out["dice/b"]), "empty ground truth is left out"
    assert out["dice"] == pytest.approx(dice / 2), "mean over classes with values"


def test_chamfer() -> None:
    a = np.array([[0.0, 0, 0], [1, 0, 0]])
    b = np.array([[0.0, 0, 1]])
    assert chamfer_mm(a, b) == pytest.approx(0.5 * ((1 + math.sqrt(2)) / 2 + 1))
    assert chamfer_mm(np.zeros((0, 3)), b) == math.inf
    assert math.isnan(chamfer_mm(b, np.zeros((0, 3))))
    rng = np.random.default_rng(0)  # the k-d tree's nearest neighbours are every pair's closest
    p, q = rng.normal(size=(700, 3)) * 20, rng.normal(size=(500, 3)) * 20 + 3
    d = torch.cdist(torch.as_tensor(p), torch.as_tensor(q))
    brute = 0.5 * float(d.min(1).values.mean() + d.min(0).values.mean())
    assert chamfer_mm(p, q) == pytest.approx(brute, rel=1e-12)
    assert chamfer_mm(torch.as_tensor(p, dtype=torch.float32), q) == pytest.approx(brute, rel=1e-6)


def test_one_surface_pass_equals_monais_three_functions() -> None:
    """`surface_distances` finds the surfaces once; the values are MONAI's own three functions'."""
    import warnings

    from monai.metrics import (
        compute_average_surface_distance,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    rng = np.random.default_rng(0)
    for spacing in ((1.5, 1.5, 1.5), (0.8, 0.8, 3.0)):
        for _ in range(3):
            z = np.indices((30, 28, 26)).astype(float)
            centre = rng.uniform(10, 16, size=3)[:, None, None, None]
            radius = rng.uniform(5, 9)
            gt = ((z - centre) ** 2).sum(0) < radius**2
            pred = ((z - centre - rng.normal(0, 1.5, size=3)[:, None, None, None]) ** 2).sum(0) < (
                radius + rng.normal(0, 1.5)
            ) ** 2
            pred &= rng.random(pred.shape) > 0.02  # holes: surfaces of another shape
            p, g = (torch.as_tensor(v)[None, None].float() for v in (pred, gt))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = (
                    float(compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=list(spacing))),
                    float(compute_average_surface_distance(p, g, include_background=True, symmetric=True, spacing=list(spacing))),
                    float(compute_surface_dice(p, g, [2.0], include_background=True, spacing=list(spacing))),
                )  # fmt: skip
            assert surface_distances(pred, gt, spacing, 2.0) == pytest.approx(expected, rel=1e-6, abs=1e-9)
