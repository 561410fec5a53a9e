"""3D metrics in millimetres, as torchmetrics `Metric`s (distributed-safe through their state).

Scores are computed on the source scan's own voxel grid at its own, possibly anisotropic,
spacing (the predicted surface voxelised there, against the scan's own mask), as
TotalSegmentator's evaluation does, so numbers do not depend on the decoder's resolution.
`sample_metrics` computes one sample's values; `MeshMetrics` only accumulates them.
The functional core leans on the field's references: MONAI's `compute_hausdorff_distance`
(percentile 95), `compute_average_surface_distance` (symmetric) and `compute_surface_dice`, with
the voxel spacing in mm. Empty masks follow one rule for every metric: ground truth empty -> the
sample is left out (NaN); prediction empty with ground truth present -> Dice, IoU and NSD are 0,
and the distances (HD95, ASSD, Chamfer) are not averaged as infinity but counted as failures.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

__all__ = [
    "METRICS",
    "MeshMetrics",
    "Spacing",
    "WeightedMeans",
    "chamfer_mm",
    "overlap",
    "sample_metrics",
    "surface_distances",
]

METRICS = ("dice", "iou", "hd95_mm", "assd_mm", "nsd", "chamfer_mm", "drawn_dice")
"""What validation and test log per class; ``drawn_dice`` is the prediction against the drawing on
the drawn planes (`lora_sam3d.models.drawing.drawn_dice`), the others against the truth in 3D."""


Spacing = float | tuple[float, float, float] | np.ndarray


def overlap(pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean volumes; NaN when the ground truth is empty."""
    g = int(gt.sum())
    if g == 0:
        return math.nan, math.nan
    inter = int((pred & gt).sum())
    p = int(pred.sum())
    return 2 * inter / (p + g), inter / (p + g - inter)


def surface_distances(
    pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray, spacing_mm: Spacing, tolerance_mm: float
) -> tuple[float, float, float]:
    """(HD95 mm, ASSD mm, NSD at ``tolerance_mm``) of two boolean volumes (MONAI).

    ``spacing_mm``: one voxel size, or one per axis. Both volumes are first cropped to the box
    holding either (plus one voxel), which changes no distance. Ground truth empty -> all NaN;
    prediction empty -> (inf, inf, 0.0). The surfaces and their distances are found once, by
    MONAI's `get_edge_surface_distance`, and the three values follow from them exactly as MONAI's
    `compute_hausdorff_distance` (percentile 95, symmetric), `compute_average_surface_distance`
    (symmetric) and `compute_surface_dice` compute them, each of which would find them again
    (three distance transforms instead of one; tests/test_metrics.py checks the equality).
    """
    from monai.metrics.utils import get_edge_surface_distance

    if not gt.any():
        return math.nan, math.nan, math.nan
    if not pred.any():
        return math.inf, math.inf, 0.0
    pred, gt = torch.as_tensor(np.asarray(pred)), torch.as_tensor(np.asarray(gt))
    nz = torch.nonzero(pred | gt)
    lo = (nz.min(0).values - 1).clamp_min(0).tolist()
    hi = (nz.max(0).values + 2).tolist()
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    spacing = [float(v) for v in np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, (to_gt, to_pred), _ = get_edge_surface_distance(
            pred[box], gt[box], distance_metric="euclidean", spacing=spacing, symmetric=True
        )
    hd95 = max(float(torch.quantile(d, 0.95)) for d in (to_gt, to_pred))
    assd = float(torch.cat([to_gt, to_pred]).mean())
    within = int((to_gt <= tolerance_mm).sum()) + int((to_pred <= tolerance_mm).sum())
    return hd95, assd, within / (len(to_gt) + len(to_pred))


def chamfer_mm(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Symmetric Chamfer distance: mean of the two mean nearest-neighbour distances (same units as
    input), exact, in float64; nearest neighbours from scipy's k-d tree (O(n log m), where all
    pairwise distances would cost n * m)."""
    from scipy.spatial import cKDTree

    pa = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64).reshape(-1, 3)
    pb = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64).reshape(-1, 3)
    if len(pa) == 0 or len(pb) == 0:
        return math.inf if len(pb) else math.nan
    ab = cKDTree(pb).query(pa)[0]
    ba = cKDTree(pa).query(pb)[0]
    return 0.5 * float(ab.mean() + ba.mean())


def sample_metrics(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    spacing_mm: Spacing,
    tolerance_mm: float = 3.0,
    pred_points: np.ndarray | None = None,
    gt_points: np.ndarray | None = None,
) -> dict[str, float]:
    """One sample's Dice, IoU, HD95, ASSD, NSD (and Chamfer when both surfaces are given, in mm).

    ``pred``, ``gt``: boolean volumes on one grid of voxel size ``spacing_mm`` (scalar or per axis).
    Empty ground truth -> NaN (left out); empty prediction -> Dice/IoU/NSD 0 and infinite
    distances (counted as a failure by `MeshMetrics`).
    """
    dice, iou = overlap(pred, gt)
    hd95, assd, nsd = surface_distances(pred, gt, spacing_mm, tolerance_mm)
    values = {"dice": dice, "iou": iou, "hd95_mm": hd95, "assd_mm": assd, "nsd": nsd}
    if pred_points is not None and gt_points is not None:
        values["chamfer_mm"] = chamfer_mm(pred_points, gt_points)
    return values


class MeshMetrics(Metric):
    """Per-class Dice, IoU, HD95, ASSD, NSD and Chamfer over samples, each sample one class.

    State: per class and metric a sum and a count, plus per class the number of failures (empty
    prediction where the ground truth has the structure); all summed across processes.
    `compute` returns ``{metric: mean over classes, f"{metric}/{class}": per class,
    f"failures/{class}": count}``.
    """

    full_state_update = False

    def __init__(self, classes: list[str], nsd_tolerance_mm: float = 3.0, **kwargs: Any) -> None:
        # kwargs: torchmetrics options, e.g. sync_on_compute=False for one process's own samples
        super().__init__(**kwargs)
        self.classes = list(classes)
        self.nsd_tolerance_mm = nsd_tolerance_mm
        c = len(self.classes)
        self.add_state("sums", torch.zeros(len(METRICS), c, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(len(METRICS), c, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("failures", torch.zeros(c, dtype=torch.float64), dist_reduce_fx="sum")

    def add(self, class_index: int, values: dict[str, float]) -> None:
        """Accumulate one sample's metric values (NaN = not counted, inf distance = a failure)."""
        failed = False
        for i, name in enumerate(METRICS):
            v = values.get(name, math.nan)
            if math.isinf(v):
                failed = True
            elif not math.isnan(v):
                self.sums[i, class_index] += v
                self.counts[i, class_index] += 1
        if failed:
            self.failures[class_index] += 1

    def update(self, values: list[dict[str, float]], class_index: torch.Tensor | list[int]) -> None:
        """Accumulate samples' values (from `sample_metrics`) with their class indices."""
        for v, c in zip(values, class_index, strict=True):
            self.add(int(c), v)

    def compute(self) -> dict[str, torch.Tensor]:
        means = self.sums / self.counts.clamp_min(1)
        means[self.counts == 0] = math.nan
        out: dict[str, torch.Tensor] = {}
        for i, name in enumerate(METRICS):
            per_class = means[i]
            valid = ~torch.isnan(per_class)
            out[name] = (
                per_class[valid].mean() if valid.any() else torch.tensor(math.nan, dtype=torch.float64)
            )
            for c, cls in enumerate(self.classes):
                out[f"{name}/{cls}"] = per_class[c]
        for c, cls in enumerate(self.classes):
            out[f"failures/{cls}"] = self.failures[c]
        return out


class WeightedMeans(Metric):
    """Sample-weighted means of named per-batch values (losses, diagnostics), correct across processes.

    Lightning's ``log(..., sync_dist=True)`` averages each process's own mean, which weighs samples
    unequally when processes hold different numbers of them (an odd-sized validation set on two
    processes); here each process keeps ``value * samples`` and ``samples``, summed across processes.
    Names never updated compute to NaN.
    """

    full_state_update = False

    def __init__(self, names: list[str] | tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.names = list(names)
        self.add_state("sums", torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: dict[str, torch.Tensor | float], samples: int) -> None:
        for name, value in values.items():
            i = self.names.index(name)
            self.sums[i] += float(value) * samples
            self.counts[i] += samples

    def compute(self) -> dict[str, torch.Tensor]:
        means = self.sums / self.counts.clamp_min(1)
        means[self.counts == 0] = math.nan
        return dict(zip(self.names, means, strict=True))
