"""The `lora-sam3d` command: its entry point (`command`), the LightningCLI behind fit/validate/test/
predict (`trainer`) and the one-line error it prints (`errors`)."""

from lora_sam3d.cli.command import main

__all__ = ["main"]
