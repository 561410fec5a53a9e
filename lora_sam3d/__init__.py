"""lora-sam3d: LoRA fine-tuning of SAM 3D Objects' mesh decoder on medical volumes.

``lora_sam3d.reconstruct(lora_sam3d.load_model(path), scan, mask, class_name, slices=...)`` is the
one call for a notebook (`lora_sam3d.predict.api`); scans and masks may be files or in memory. The public names below are imported when first used, so
``import lora_sam3d`` stays light.

The package by role: `data/` (volumes, cases, samples, the cache, requests), `inputs` (the typed
batch), `models/` (the two stages and the adapter folder), `lora/` (the adapters, no SAM 3D
knowledge), `sparse/` (sparse tensors), `training/` and `predict/` (the Lightning parts and what a
prediction writes), `cli/` (the command), `settings/` (the settings tree and earlier names), and the
leaves `geometry`, `metrics`, `io`, with `callbacks` naming the callbacks configs use.
"""

from importlib import import_module
from typing import Any

from lora_sam3d.settings.old_keys import MovedModules

MovedModules.install()  # the flat layout's module paths still import (lora_sam3d.module, ...)

__version__ = "0.1.0"

_PUBLIC = {
    "reconstruct": "lora_sam3d.predict.api",
    "load_model": "lora_sam3d.predict.api",
    "Session": "lora_sam3d.predict.session",
    "Reconstructor": "lora_sam3d.models.reconstructor",
    "LoRAMeshDecoderModule": "lora_sam3d.training.module",
    "TSDataModule": "lora_sam3d.training.datamodule",
    "TS_SAM3D_Dataset": "lora_sam3d.data.dataset",
}

__all__ = [
    "LoRAMeshDecoderModule",
    "Reconstructor",
    "Session",
    "TSDataModule",
    "TS_SAM3D_Dataset",
    "__version__",
    "load_model",
    "reconstruct",
]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'lora_sam3d' has no attribute {name!r}")
