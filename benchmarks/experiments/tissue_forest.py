"""Experiment code (not used by the model): the per-request tissue forest of
`lora_sam3d.data.tissue_forest` put in the relative reading's place (``forest`` in
`tissue_model.py`), on the frame's own cells, for an adapter that was never trained on it.

The product gives the forest's probability as a channel beside the relative reading
(``data.context.tissue_model: forest``); this variant replaces that reading with it instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lora_sam3d.data.tissue_forest import tissue_probability

__all__ = ["forest_sample"]


def forest_sample(sample: dict[str, Any], inside_views: np.ndarray) -> bool:
    """Read a sample's scan through its own tissue forest, in place: the context's intensity channel
    becomes the forest's probability (fitted on the context's own cells) and each view's pixels the
    probability on its plane (0.5 past the scan). False (the sample untouched) when it carries no scan
    or too small a drawing."""
    import torch

    context = sample.get("context")
    if context is None:
        return False
    context = np.asarray(context, dtype=np.float32)
    prob = tissue_probability(context[0], context[1] > 0, sample)
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
