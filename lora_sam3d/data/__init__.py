"""Medical volumes to slice samples: NIfTI -> canonical isotropic volume -> slice -> frame -> targets."""

from lora_sam3d.data.cases import Case, discover_cases
from lora_sam3d.data.datamodule import PhantomSpec, TSDataModule
from lora_sam3d.data.dataset import TS_SAM3D_Dataset, assign_splits, collate, slice_inputs
from lora_sam3d.data.frame import Frame, make_frame
from lora_sam3d.data.phantoms import HEART_CLASSES, SHAPE_CLASSES, phantom_label_values, write_phantoms
from lora_sam3d.data.requests import PredictionDataset, PredictItem
from lora_sam3d.data.settings import DataSettings
from lora_sam3d.data.volume import DataError, Preprocessing, Volume, load_volume

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
    "slice_inputs",
    "write_phantoms",
]
