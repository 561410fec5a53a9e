"""Pointwise sparse layers: linear, norms and activations on the features of a `SparseTensor`.

Names and parameter shapes follow SAM 3D's `modules/sparse` so checkpoints load unchanged. Norms
compute in fp32 whatever the features' dtype (the reference's `*32` classes).
"""

from __future__ import annotations

import torch
from torch import nn

from lora_sam3d.sparse.tensor import SparseTensor


class SparseLinear(nn.Linear):
    """``nn.Linear`` on the features; coordinates pass through."""

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(super().forward(x.feats))


class SparseSiLU(nn.SiLU):
    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(super().forward(x.feats))


class SparseGELU(nn.GELU):
    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(super().forward(x.feats))


class LayerNorm32(nn.LayerNorm):
    """LayerNorm on a dense (..., C) tensor, computed in fp32 and cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class SparseGroupNorm32(nn.GroupNorm):
    """GroupNorm over the voxels of each batch element separately, in fp32.

    The reference loops over batch elements and calls ``nn.GroupNorm`` on a (1, C, n) view; this
    does the same statistics for all elements at once with segment sums (two passes: mean, then
    centred variance), so it costs a few elementwise passes whatever the batch size.
    """

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        feats = x.feats.float()
        n, c = feats.shape
        g = self.num_groups
        batch = x.batch_index
        grouped = feats.view(n, g, c // g)
        count = torch.bincount(batch, minlength=x.batch_size).clamp_min(1).to(feats.dtype) * (c // g)
        mean = feats.new_zeros(x.batch_size, g).index_add_(0, batch, grouped.sum(-1)) / count[:, None]
        centred = grouped - mean[batch][:, :, None]
        var = feats.new_zeros(x.batch_size, g).index_add_(0, batch, centred.pow(2).sum(-1)) / count[:, None]
        out = (centred * torch.rsqrt(var + self.eps)[batch][:, :, None]).view(n, c)
        if self.affine:
            out = torch.addcmul(self.bias, out, self.weight)
        return x.replace(out.to(x.dtype))


__all__ = ["LayerNorm32", "SparseGELU", "SparseGroupNorm32", "SparseLinear", "SparseSiLU"]
