"""Medical volumes to slice samples: NIfTI -> canonical isotropic volume -> slice -> frame -> targets.

Everything here is plain PyTorch and NumPy. `TSDataModule` lives with the Lightning parts
(`lora_sam3d.training.datamodule`); it is found here too, imported when first asked for.
"""

from typing import Any

from lora_sam3d.data import abdomen as _abdomen  # noqa: F401  (registers the abdomen phantoms)
from lora_sam3d.data.cases import Case, discover_cases
from lora_sam3d.data.dataset import TS_SAM3D_Dataset, assign_splits
from lora_sam3d.data.frame import Frame, make_frame
from lora_sam3d.data.nifti import DataError
from lora_sam3d.data.phantoms import (
    HEART_CLASSES,
    SHAPE_CLASSES,
    PhantomSpec,
    phantom_label_values,
    write_phantoms,
)
from lora_sam3d.data.requests import PredictionDataset, PredictItem
from lora_sam3d.data.sample import slice_sample
from lora_sam3d.data.settings import DataSettings
from lora_sam3d.data.volume import Preprocessing, Volume, load_volume
from lora_sam3d.inputs import collate

__all__ = [
    "HEART_CLASSES",
    "SHAPE_CLASSES",
    "Case",
    "DataError",
    "DataSettings",
    "Frame",
    "PhantomSpec",
    "PredictItem",
    "PredictionDataset",
    "Preprocessing",
    "TSDataModule",
    "TS_SAM3D_Dataset",
    "Volume",
    "assign_splits",
    "collate",
    "discover_cases",
    "load_volume",
    "make_frame",
    "phantom_label_values",
    "slice_sample",
    "write_phantoms",
]


def __getattr__(name: str) -> Any:
    if name == "TSDataModule":
        from lora_sam3d.training import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'lora_sam3d.data' has no attribute {name!r}")
