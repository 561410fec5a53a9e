"""Baseline for the experiment: a plain dense 3D CNN from the same slice evidence to occupancy.

No pretrained base, no sparse decoder: `SparseStructureNet`'s U-Net run densely on the frame's
(4R)^3 cells (the decoder's output grid), trained from scratch with the same losses, data, frame
and budget, and scored by the same code on the scan's own grid. With ``model.context.read: true``
it also reads the scan at each cell (`Evidence.context`, on the same (4R)^3 cells), the inputs the
two-stage model gets. It answers "does the pretrained two-stage decoder with LoRA beat what a plain
network learns from these phantoms alone?".

    python benchmarks/experiments/plain_cnn.py fit --config <config>    (then test / predict, as lora-sam3d)
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch.nn import functional as F

from lora_sam3d.cli.trainer import run
from lora_sam3d.inputs import CONTEXT_CHANNELS, Batch
from lora_sam3d.models import Reconstruction
from lora_sam3d.models.latent import SliceUnprojection, context_on_grid
from lora_sam3d.models.structure import SparseStructureNet
from lora_sam3d.training.module import LoRAMeshDecoderModule


class DenseOccupancyCNN(LoRAMeshDecoderModule):
    """Occupancy logits on the (4R)^3 cells from a dense U-Net; the decoder and stage 1 are unused."""

    def __init__(self, *args: Any, cnn_channels: int = 16, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        n = 4 * self.resolution
        self.cells = SliceUnprojection(n)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.model.config.base.seed)
            extra = CONTEXT_CHANNELS if self.model.config.context.read else 0
            self.cnn = SparseStructureNet(in_channels=8 + extra, channels=cnn_channels, latent_channels=0)

    def configure_adapters(self) -> None:
        self.requires_grad_(False)
        self.cnn.requires_grad_(True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The checkpoint holds the CNN's weights (``cnn.``), not the two-stage model's trainable ones."""
        self.configure_adapters()
        checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}

    def forward(self, batch: Batch) -> Reconstruction:
        x = self.cells(batch.evidence)
        if self.model.config.context.read:
            x = torch.cat([x, context_on_grid(batch.evidence, x.shape[-1]).to(x.dtype)], dim=1)
        logits, _ = self.cnn(x)  # (B, n, n, n) cells
        n = logits.shape[-1]
        # vertex values: minus the mean logit of the (up to 8) cells around each vertex, in frame units
        padded = F.pad(logits[:, None], (1, 1, 1, 1, 1, 1), mode="replicate")
        vertices = -F.avg_pool3d(padded, kernel_size=2, stride=1)[:, 0] / n
        return Reconstruction(vertices)


if __name__ == "__main__":
    run(sys.argv[1:], model_class=DenseOccupancyCNN)
    sys.exit(0)
