"""lora-sam3d: LoRA fine-tuning of SAM 3D Objects' mesh decoder on medical volumes."""

__all__ = ["__version__"]

__version__ = "0.1.0"
