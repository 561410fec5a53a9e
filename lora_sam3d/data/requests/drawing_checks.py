"""What a request's drawn slices say about themselves once cut into its frame: the tissue they mark
(against what the model saw of the class, or whether a relative reading can tell it from its
surroundings) and whether a mask reaches the frame's edge. Each finding is a warning naming the
request (`where`: ``predict item 3 (liver in ct.nii.gz``), or an error where the user asked for one."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from lora_sam3d.data.nifti import DataError
from lora_sam3d.data.tissue import Tissue, drawn_views, inseparable, marked_tissue, tissue_mismatch
from lora_sam3d.inputs import Sample

__all__ = ["check_marked_tissue", "warn_at_edge"]


def check_marked_tissue(
    where: str,
    slices: str,
    sample: Sample,
    side_mm: float,
    inside: np.ndarray,
    trained: Sequence[float] | None,
    reading: str,
    intensity_check: str,
) -> Tissue | None:
    """The tissue under the drawn masks (`marked_tissue`; None, with a warning, when the masks are too
    small for statistics), checked against what the model saw of the class in training
    (``trained``, `tissue_mismatch`) or, for a ``relative`` reading, for a contrast (`inseparable`):
    a warning, or an error with ``intensity_check: error``. ``slices``: the drawn slices' names."""
    images, masks = drawn_views(sample)
    tissue = marked_tissue(images, masks, side_mm / masks.shape[-1], inside)
    if tissue is None and (trained is not None or reading == "relative"):
        warnings.warn(
            f"{where}, {slices}): its drawn masks are too small (or fill their slices) for statistics of the "
            "marked tissue: not compared with the training scans, and a relative reading of the scan reads neutral",
            stacklevel=3,
        )
    if tissue is None:
        return tissue
    if reading == "relative":  # no absolute unit is read: what it needs is a contrast
        why = inseparable(tissue)
    else:
        why = None if trained is None else tissue_mismatch(tissue, trained)
    if why is None:
        return tissue
    message = (
        f"{where}): {why}; is the scan another modality or rescaled, its contrast inverted, or the mask "
        "drawn on another scan?"
    )
    if intensity_check == "error":
        raise DataError(f"{message} (data.predict.intensity_check: error refuses it; warn only warns)")
    warnings.warn(message, stacklevel=3)
    return tissue


def warn_at_edge(where: str, names: Sequence[str], class_name: str, sample: Sample, side_mm: float) -> None:
    """A drawn mask that reaches the frame's edge is cut there: the structure is larger than the frame
    its class was trained with, and its surface past the edge cannot be reconstructed. ``names``:
    the drawn slices' names, in the sample's view order."""
    masks = drawn_views(sample)[1].astype(bool)
    edge = masks[:, [0, -1], :].any(axis=(1, 2)) | masks[:, :, [0, -1]].any(axis=(1, 2))
    if not edge.any():
        return
    pixel_mm = side_mm / masks.shape[-1]
    cut = [names[k] for k in np.flatnonzero(edge) if k < len(names)]
    rows, cols = np.flatnonzero(masks.any(axis=(0, 2))), np.flatnonzero(masks.any(axis=(0, 1)))
    span = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) * pixel_mm
    warnings.warn(
        f"{where}): the mask of {', '.join(cut)} reaches the edge of the {side_mm:.0f} mm frame of {class_name} "
        f"(at least {span:.0f} mm of it is inside): the structure is larger than the frame the model was "
        "trained with, and its surface past the edge is cut; give data.frame.extent_mm a larger extent for "
        "this class, or a model trained on larger frames",
        stacklevel=3,
    )
