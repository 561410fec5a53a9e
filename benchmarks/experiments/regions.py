"""A stack's error split between the structure's middle (between the first and the last drawn
plane) and its two caps (beyond them), where a stack of slices 10 mm or more apart leaves most of
its error; shared by the model's and ITK's scoring. Plain numpy."""

from __future__ import annotations

import numpy as np


def region_scores(pred: np.ndarray, gt: np.ndarray, middle: np.ndarray) -> dict[str, float]:
    """Voxel counts of the middle and the caps: overlap, both volumes and the wrong voxels."""
    out = {}
    for name, region in (("middle", middle), ("caps", ~middle)):
        p, g = pred & region, gt & region
        out |= {f"{name}_inter": float((p & g).sum()), f"{name}_sum": float(p.sum() + g.sum()),
                f"{name}_wrong": float((p ^ g).sum())}  # fmt: skip
    return out


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    """Pooled Dice of the middle and of the caps, and the share of wrong voxels that lie in the caps."""
    total = {k: sum(r[k] for r in rows) for k in rows[0]}
    wrong = total["middle_wrong"] + total["caps_wrong"]
    return {
        "middle_dice": 2 * total["middle_inter"] / max(total["middle_sum"], 1.0),
        "caps_dice": 2 * total["caps_inter"] / max(total["caps_sum"], 1.0),
        "caps_share_of_error": total["caps_wrong"] / max(wrong, 1.0),
        "samples": float(len(rows)),
    }
