"""Experiment code (not used by the model): a tissue model per request, what this scan says about the tissue the user drew, learned from the
drawn slices alone (as ilastik's pixel classifier does for its users).

Local features of the scan around the slices at a few scales (smoothed intensity, gradient
magnitude, Hessian eigenvalues: scikit-image's ``multiscale_basic_features``, on the frame's cells)
feed a small random forest (scikit-learn) fitted on the drawn pixels against a ring of the
surroundings on the same slices. Its probability over the frame is evidence of the same meaning as
the relative reading (`lora_sam3d.data.tissue.relative_intensity`: towards 1, like the drawn tissue),
for any contrast, CT or MR, and it may replace that reading (`forest_sample`). Nothing here is hand
written but the choice of training pixels: no library picks them from a drawing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["FOREST_TREES", "fit_tissue_forest", "forest_sample", "tissue_probability", "training_cells"]

FOREST_TREES = 40
"""Trees of the per-request forest: enough for a stable probability, fast on two cores."""

SIGMAS = (1.0, 2.0, 4.0)
"""Feature scales, in cells of the frame's grid (the demo's cells are about 1-2 mm)."""

MAX_PIXELS = 4000
"""Training pixels taken per class (drawn, surroundings): a forest gains little from more."""

RING_CELLS = (2, 8)
"""The surroundings a forest learns against: cells 2 to 8 away from the drawing on its slice (the
drawing's own border is left out: its voxels are partly both)."""


def _features(volume: np.ndarray) -> np.ndarray:
    """(n, n, n, F) multiscale features of a (n, n, n) intensity volume."""
    from skimage.feature import multiscale_basic_features

    return multiscale_basic_features(
        volume, intensity=True, edges=True, texture=True, sigma_min=SIGMAS[0], sigma_max=SIGMAS[-1],
        num_sigma=len(SIGMAS), channel_axis=None,
    ).astype(np.float32)  # fmt: skip


def training_cells(sample: Mapping[str, Any], inside: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell indices (M, 3) and labels (M,) of the drawn pixels and their surroundings on every valid
    view, each view's pixel (i, j) being the cell of its plane at in-plane position (i, j)."""
    valid = np.asarray(sample["view_valid"], dtype=bool)
    masks = np.asarray(sample["view_mask"], dtype=bool)
    axes, offsets = np.asarray(sample["view_axis"]), np.asarray(sample["view_offset"], dtype=float)
    cells, labels = [], []
    for k in np.flatnonzero(valid):
        mask = masks[k]
        if mask.shape[0] != n:
            raise ValueError(f"views of {mask.shape[0]} pixels on a grid of {n} cells: expected equal sizes")
        near = ndimage.binary_dilation(mask, iterations=RING_CELLS[0]) if mask.any() else mask
        far = ndimage.binary_dilation(mask, iterations=RING_CELLS[1]) if mask.any() else mask
        seen = inside[:, :, :]  # the cells inside the scan
        axis = int(axes[k])
        c = int(np.clip(np.floor((offsets[k] + 0.5) * n), 0, n - 1))
        on_scan = np.take(seen, c, axis=axis) > 0
        for value, region in ((1, mask & on_scan), (0, far & ~near & on_scan)):
            i, j = np.nonzero(region)
            index = np.empty((len(i), 3), dtype=int)
            p, q = (a for a in range(3) if a != axis)
            index[:, axis], index[:, p], index[:, q] = c, i, j
            cells.append(index)
            labels.append(np.full(len(i), value, dtype=np.int8))
    if not cells:
        return np.zeros((0, 3), dtype=int), np.zeros(0, dtype=np.int8)
    return np.concatenate(cells), np.concatenate(labels)


def fit_tissue_forest(
    features: np.ndarray, cells: np.ndarray, labels: np.ndarray, seed: int = 0
) -> Any | None:
    """A random forest on the features of the training cells; None when either class is missing."""
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(seed)
    picked = []
    for value in (0, 1):
        where = np.flatnonzero(labels == value)
        if where.size == 0:
            return None
        picked.append(rng.choice(where, min(MAX_PIXELS, where.size), replace=False))
    take = np.concatenate(picked)
    x = features[cells[take, 0], cells[take, 1], cells[take, 2]]
    forest = RandomForestClassifier(
        n_estimators=FOREST_TREES, max_depth=12, min_samples_leaf=3, class_weight="balanced", n_jobs=2,
        random_state=seed,
    )  # fmt: skip
    return forest.fit(x, labels[take])


def tissue_probability(context: np.ndarray, sample: Mapping[str, Any]) -> np.ndarray | None:
    """(n, n, n) probability that each of the frame's cells is the drawn tissue, from a forest fitted
    on the drawn slices of ``sample`` (its ``context``: the scan's normalised intensity and inside
    channels); 0 outside the scan; None when the drawing gives no training pixels of one class."""
    inside = context[1] > 0
    n = context.shape[-1]
    cells, labels = training_cells(sample, inside, n)
    features = _features(context[0])
    forest = fit_tissue_forest(features, cells, labels)
    if forest is None:
        return None
    out = np.zeros((n, n, n), dtype=np.float32)
    out[inside] = forest.predict_proba(features[inside])[:, 1]
    return out


def forest_sample(sample: dict[str, Any], inside_views: np.ndarray) -> bool:
    """Read a sample's scan through its own tissue forest, in place: the context's intensity channel
    becomes the forest's probability and each view's pixels the probability on its plane (0.5 past
    the scan). False (the sample untouched) when it carries no scan or too small a drawing."""
    import torch

    context = sample.get("context")
    if context is None:
        return False
    context = np.asarray(context, dtype=np.float32)
    prob = tissue_probability(context, sample)
    if prob is None:
        return False
    n = prob.shape[0]
    sample["shown_image"] = torch.as_tensor(
        np.asarray(sample["view_image"])[np.asarray(sample["view_valid"])]
    ).clone()
    context = context.copy()
    context[0] = prob * context[1]
    sample["context"] = torch.from_numpy(context)
    views = np.asarray(sample["view_image"], dtype=np.float32).copy()
    valid = np.asarray(sample["view_valid"], dtype=bool)
    for row, k in enumerate(np.flatnonzero(valid)):
        axis = int(sample["view_axis"][k])
        c = int(np.clip(np.floor((float(sample["view_offset"][k]) + 0.5) * n), 0, n - 1))
        plane = np.take(prob, c, axis=axis)
        views[k] = np.where(inside_views[row], plane, 0.5)
    sample["view_image"] = torch.from_numpy(views)
    return True
