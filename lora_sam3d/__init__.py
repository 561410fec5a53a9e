"""lora-sam3d: LoRA fine-tuning of SAM 3D Objects' mesh decoder on medical volumes.

``lora_sam3d.reconstruct(model, image, mask, class_name, slices=...)`` is the one call for a
notebook (`lora_sam3d.api`); it is imported when first used, so ``import lora_sam3d`` stays light.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "reconstruct"]


def __getattr__(name: str) -> Any:
    if name == "reconstruct":
        from lora_sam3d.api import reconstruct

        return reconstruct
    raise AttributeError(f"module 'lora_sam3d' has no attribute {name!r}")
