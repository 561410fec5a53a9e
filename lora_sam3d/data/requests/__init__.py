"""Reconstruction requests on new scans, addressed as a viewer shows them.

A user reads "axial slice 57" in 3D Slicer, ITK-SNAP or nibabel: slice 57 of the *file's own*
voxel numbering along the file axis closest to the axial direction. `PredictItem` takes that
(``axis: axial, index: 57``), or the plane's world coordinate (``position_mm``, RAS), and a mask
as the user has it: a 3D mask or label map on the scan's grid, or a 2D mask of that slice only
(2D NIfTI or PNG). `locate_slice` turns the request into the file axis and index (nibabel's
``io_orientation`` names the closest axis), and `PredictionDataset` into the model's input on
the canonical isotropic grid the model works on. Requests are checked when the dataset is built,
in the main process, so a bad one is reported once, by its number.
"""

from lora_sam3d.data.requests.dataset import PredictionDataset
from lora_sam3d.data.requests.items import PredictItem, SliceRef, locate_slice, parse_axis
from lora_sam3d.data.requests.masks import (
    check_mask_grid,
    contradicting_pairs,
    load_mask_nifti,
    read_mask_volume,
    read_png_mask,
    read_slice_mask,
)

__all__ = [
    "PredictItem",
    "PredictionDataset",
    "SliceRef",
    "check_mask_grid",
    "contradicting_pairs",
    "load_mask_nifti",
    "locate_slice",
    "parse_axis",
    "read_mask_volume",
    "read_png_mask",
    "read_slice_mask",
]
