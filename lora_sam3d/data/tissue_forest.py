"""A tissue model per sample: what this scan says about the tissue the user drew, learned from the
drawn slices alone (as ilastik's pixel classifier does for its users), given to the model as one
more channel of the scan's context (``data.context.tissue_model: forest``, ``model.context.tissue``).

Local features of the scan around the slices at a few scales (smoothed intensity, gradient
magnitude, Hessian eigenvalues: scikit-image's ``multiscale_basic_features``) feed a small random
forest (scikit-learn) fitted on the drawn pixels against a ring of their surroundings on the same
slices. Its probability over the frame (towards 1: like the drawn tissue) is fitted per scan and
per structure, so it holds for any contrast, CT or MR; the relative reading
(`lora_sam3d.data.tissue.relative_intensity`) stays beside it. The forest runs on the context's
grid halved (`FOREST_CELLS` of the frame's cells per forest cell): a sample costs about 0.4 s on two
cores instead of 0.9 s. Hand-written here is only the choice of training pixels: no library picks
them from a drawing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "FOREST_TREES",
    "TISSUE_MODELS",
    "fit_tissue_forest",
    "tissue_probability",
    "training_cells",
    "with_tissue_model",
]

TISSUE_MODELS = ("none", "forest")
"""``data.context.tissue_model``: no per-sample tissue model, or the random forest."""

FOREST_TREES = 40
"""Trees of the per-sample forest: enough for a stable probability, fast on two cores."""

SIGMAS = (1.0, 2.0, 4.0)
"""Feature scales, in cells of the forest's grid."""

MAX_PIXELS = 4000
"""Training pixels taken per label (drawn, surroundings): a forest gains little from more."""

RING_PIXELS = (2, 8)
"""The surroundings a forest learns against: view pixels 2 to 8 away from the drawing (the
drawing's own border is left out: its pixels are partly both)."""

FOREST_CELLS = 2
"""The forest's grid: the context's cells pooled by this factor per axis."""

NEUTRAL = 0.5
"""The channel's value inside the scan where no forest could be fitted (a drawing too small)."""


def _features(volume: np.ndarray) -> np.ndarray:
    """(m, m, m, F) multiscale features of an (m, m, m) intensity volume."""
    from skimage.feature import multiscale_basic_features

    return multiscale_basic_features(
        volume, intensity=True, edges=True, texture=True, sigma_min=SIGMAS[0], sigma_max=SIGMAS[-1],
        num_sigma=len(SIGMAS), channel_axis=None,
    ).astype(np.float32)  # fmt: skip


def training_cells(sample: Mapping[str, Any], inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cell indices (M, 3) on the (m, m, m) grid of ``inside`` (the cells inside the scan) and labels
    (M,) of the drawn pixels (1) and their surroundings (0) on every valid view of ``sample``: a
    view's pixel lies in the grid cell of its plane that holds its centre."""
    m = inside.shape[0]
    valid = np.asarray(sample["view_valid"], dtype=bool)
    masks = np.asarray(sample["view_mask"], dtype=bool)
    axes, offsets = np.asarray(sample["view_axis"]), np.asarray(sample["view_offset"], dtype=float)
    cells, labels = [], []
    for k in np.flatnonzero(valid):
        mask = masks[k]
        if not mask.any():
            continue
        size = mask.shape[0]
        near = ndimage.binary_dilation(mask, iterations=RING_PIXELS[0])
        far = ndimage.binary_dilation(mask, iterations=RING_PIXELS[1])
        axis = int(axes[k])
        c = int(np.clip(np.floor((offsets[k] + 0.5) * m), 0, m - 1))
        on_scan = np.take(inside, c, axis=axis)
        p, q = (a for a in range(3) if a != axis)
        for value, region in ((1, mask), (0, far & ~near)):
            i, j = np.nonzero(region)
            index = np.empty((len(i), 3), dtype=int)
            index[:, axis] = c
            index[:, p], index[:, q] = (i * m) // size, (j * m) // size
            keep = on_scan[index[:, p], index[:, q]]
            cells.append(index[keep])
            labels.append(np.full(int(keep.sum()), value, dtype=np.int8))
    if not cells:
        return np.zeros((0, 3), dtype=int), np.zeros(0, dtype=np.int8)
    return np.concatenate(cells), np.concatenate(labels)


def fit_tissue_forest(
    features: np.ndarray, cells: np.ndarray, labels: np.ndarray, seed: int = 0
) -> Any | None:
    """A random forest on the features of the training cells; None when either label is missing."""
    try:
        from sklearn.ensemble import RandomForestClassifier
    except ImportError as err:  # an optional dependency: only this setting needs it
        raise ImportError(
            "data.context.tissue_model: forest needs scikit-learn (pip install 'lora-sam3d[tissue]')"
        ) from err

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


def tissue_probability(
    intensity: np.ndarray, inside: np.ndarray, sample: Mapping[str, Any]
) -> np.ndarray | None:
    """(m, m, m) probability that each cell of an (m, m, m) grid is the drawn tissue, from a forest
    fitted on the drawn slices of ``sample``: ``intensity`` the scan there (any unit), ``inside``
    (bool) the cells inside the scan; 0 outside it; None when the drawing gives no training pixels
    of one label."""
    cells, labels = training_cells(sample, inside)
    features = _features(intensity)
    forest = fit_tissue_forest(features, cells, labels)
    if forest is None:
        return None
    out = np.zeros(inside.shape, dtype=np.float32)
    out[inside] = forest.predict_proba(features[inside])[:, 1]
    return out


def with_tissue_model(context: np.ndarray, sample: Mapping[str, Any], tissue_model: str) -> np.ndarray:
    """A (2, n, n, n) context (`lora_sam3d.data.frame.sample_context`, before any relative reading)
    with the tissue model's channel appended for ``tissue_model: forest``: its probability on the
    context's cells (from the forest's grid, trilinear), 0 outside the scan, `NEUTRAL` inside it where
    no forest could be fitted; a blank context (no scan) gets a blank channel. ``none``: unchanged."""
    if tissue_model == "none":
        return context
    if tissue_model not in TISSUE_MODELS:
        raise ValueError(
            f"data.context.tissue_model must be one of {list(TISSUE_MODELS)}, got {tissue_model!r}"
        )
    n = context.shape[-1]
    channel = np.zeros((1, n, n, n), dtype=np.float32)
    if context[1].any():
        f = FOREST_CELLS if n % FOREST_CELLS == 0 else 1
        m = n // f
        pooled = context[:2].reshape(2, m, f, m, f, m, f).mean(axis=(2, 4, 6))
        inside = pooled[1] > 0.5
        prob = tissue_probability(pooled[0] / np.maximum(pooled[1], 1e-6), inside, sample)
        if prob is None:
            channel[0] = NEUTRAL
        else:
            channel[0] = ndimage.zoom(prob, f, order=1, grid_mode=True, mode="nearest") if f > 1 else prob
        channel[0] *= context[1]
    return np.concatenate([context, channel]).astype(np.float32)
