"""The callbacks a config names by class path (``lora_sam3d.callbacks.AdapterCheckpoint``), in one
public place, as ``lightning.pytorch.callbacks``: the training ones live in
`lora_sam3d.training.callbacks`, the prediction writer in `lora_sam3d.predict.writer`."""

from lora_sam3d.predict.writer import MeshPredictionWriter
from lora_sam3d.training.callbacks import (
    AdapterCheckpoint,
    MergeOnEnd,
    RunSummary,
    SaveConfigOnStart,
    save_adapter_of,
)

__all__ = [
    "AdapterCheckpoint",
    "MergeOnEnd",
    "MeshPredictionWriter",
    "RunSummary",
    "SaveConfigOnStart",
    "save_adapter_of",
]
