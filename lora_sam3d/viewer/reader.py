"""napari reader: NIfTI files and DICOM series folders as layers placed in world RAS mm.

napari's own reader shows a NIfTI's voxels on a 1-voxel grid, so distances are in voxels and a mask
from another tool need not line up. Here the layer's affine is the file's (nibabel's RAS affine; a
DICOM series is read by SimpleITK through `lora_sam3d.predict.user_inputs.read_scan`), so every
layer read this way, and the plugin's meshes in world mm, share one space. A file of a few
non-negative integer values (a mask, a label map) opens as a Labels layer. A CT opens in a
soft-tissue window, any other scan between its 0.5th and 99.5th percentiles.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lora_sam3d.data.labels import label_values_present
from lora_sam3d.data.volume import AIR_HU

__all__ = ["PATH_KEY", "get_reader", "layer_data"]

PATH_KEY = "lora_sam3d_path"
"""The layer metadata key holding the file or folder a layer was read from (the widget's session reads it)."""

LayerData = tuple[np.ndarray, dict[str, Any], str]
SOFT_TISSUE_HU = (-160.0, 240.0)
"""The soft-tissue window (level 40, width 400) a CT opens with; other scans: their 0.5th-99.5th percentiles."""


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """napari's hook: a reader for a ``.nii``/``.nii.gz`` file or a folder holding DICOM files, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    target = Path(path)
    if target.is_dir():
        return layer_data if _holds_dicom(target) else None
    return layer_data if target.name.lower().endswith((".nii", ".nii.gz")) else None


def _holds_dicom(folder: Path, look_at: int = 5) -> bool:
    """Whether a few of the folder's files carry DICOM's "DICM" marker at byte 128."""
    for file in sorted(p for p in folder.iterdir() if p.is_file())[:look_at]:
        with open(file, "rb") as handle:
            handle.seek(128)
            if handle.read(4) == b"DICM":
                return True
    return False


def layer_data(path: str | list[str]) -> list[LayerData]:
    """The layer of one scan or mask: its voxels as stored, with the file's affine to world RAS mm."""
    from lora_sam3d.predict.user_inputs import read_scan

    source = Path(path[0] if isinstance(path, list) else path)
    image, name = read_scan(source)
    values = np.asanyarray(image.dataobj)
    if values.dtype == bool:
        values = values.astype(np.uint8)
    kind = "labels" if _is_label_map(values) else "image"
    meta = {"name": name, "affine": image.affine, "metadata": {PATH_KEY: str(source)}}
    if kind == "image":
        low, high = np.percentile(values.ravel(order="K")[::7], [0.5, 99.5])
        if low <= AIR_HU:  # its lowest values are air: a CT in Hounsfield units, in the soft-tissue window
            low, high = SOFT_TISSUE_HU
        meta["contrast_limits"] = (float(low), float(high) if high > low else float(low) + 1.0)
    return [(values, meta, kind)]


def _is_label_map(values: np.ndarray, at_most: int = 256) -> bool:
    """Integer voxels, none negative, with few distinct values (checked on every 7th)."""
    if not np.issubdtype(values.dtype, np.integer):
        return False
    sample = values.ravel(order="K")[::7]
    return bool(sample.min() >= 0 and len(label_values_present(sample)) < at_most)  # and 0
