"""Evidence at every level of the mesh decoder: conditioning layers beside Meta's module tree.

SAM 3D's decoder sees the object only through its latent; here the slices and the scan reach it
again at its own cells. At each level (the input level and after each subdivision: R, 2R and 4R
cells a side) every active cell reads the evidence at its centre (`lora_sam3d.models.latent.evidence_at_cells`:
the slice unprojection's 8 features and the scan's 2) and a small MLP per level adds the result to
the hidden features, through the decoder's ``cond`` seam. The layers live in their own module (its
weights under ``conditioning.`` in our base files), so Meta's ``slat_decoder_mesh`` weights still
load strictly into `SLatMeshDecoder`; each MLP's last layer starts at zero, so on Meta's weights the
decoder's output is unchanged until training moves it. Plain ``nn.Linear`` layers: LoRA adapts them
(`CONDITIONING_LORA_TARGETS`) like the decoder's own.
"""

from __future__ import annotations

from torch import nn

from lora_sam3d.inputs import Evidence
from lora_sam3d.models.decoder import CONDITIONING_PREFIX, Conditioning
from lora_sam3d.models.latent import EVIDENCE_FEATURES, SliceUnprojection, evidence_at_cells
from lora_sam3d.sparse import SparseTensor

__all__ = ["CONDITIONING_LORA_TARGETS", "CONDITIONING_PREFIX", "EvidenceConditioning"]

CONDITIONING_LORA_TARGETS = r"levels\.\d\.(0|2)"
"""Both linears of every level's MLP (full-match regex on module names)."""


class EvidenceConditioning(nn.Module):
    """One MLP per decoder level: (N, 10 to 13) evidence at the level's cells -> (N, channels) added to ``h``.

    Args:
        model_channels: the decoder's width (its levels have C, C/4 and C/8 channels).
        hidden: the MLPs' hidden width.
        features: the evidence's features a cell (12 with the slices' interpolation, one more with
            the tissue model's channel).
    """

    def __init__(self, model_channels: int, hidden: int = 32, features: int = EVIDENCE_FEATURES) -> None:
        super().__init__()
        self.config = {"model_channels": model_channels, "hidden": hidden, "features": features}
        widths = (model_channels, model_channels // 4, model_channels // 8)
        self.levels = nn.ModuleList(
            nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, c)) for c in widths
        )
        for level in self.levels:
            nn.init.zeros_(level[2].weight)
            nn.init.zeros_(level[2].bias)

    def bind(self, evidence: Evidence, resolution: int, reader: SliceUnprojection) -> Conditioning:
        """The decoder's ``cond`` for one batch: level j's cells lie on a (resolution * 2^j)^3 grid."""
        context_channels = self.config["features"] - reader.channels

        def cond(level: int, h: SparseTensor) -> SparseTensor:
            feats = evidence_at_cells(evidence, h.coords, resolution * 2**level, reader, context_channels)
            return h.replace(h.feats + self.levels[level](feats.to(h.feats.dtype)))

        return cond
