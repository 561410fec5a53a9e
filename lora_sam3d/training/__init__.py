"""The Lightning side of training: the module, the data module, the link between them, callbacks,
checkpoint files and the losses."""

from typing import Any

__all__ = ["LoRAMeshDecoderModule", "TSDataModule"]


def __getattr__(name: str) -> Any:  # imported when first used: the data module pulls in all of data/
    if name == "LoRAMeshDecoderModule":
        from lora_sam3d.training.module import LoRAMeshDecoderModule

        return LoRAMeshDecoderModule
    if name == "TSDataModule":
        from lora_sam3d.training.datamodule import TSDataModule

        return TSDataModule
    raise AttributeError(f"module 'lora_sam3d.training' has no attribute {name!r}")
