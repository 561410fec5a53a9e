"""Self-attention over the voxels of a sparse tensor: per batch element (`full`) or in 3D windows (`swin`).

Both reduce to attention within groups of variable length. The reference does that on the CPU with
one dense (N, N) block-diagonal mask over all voxels, which is quadratic in the whole batch;
here groups are packed into padded batches of similar length (lengths rounded up to a power of
two, at most 2x padding) and each pack goes through `torch.nn.functional.scaled_dot_product_attention`
with a key-padding mask. Packing plans are cached on the tensor, so blocks with the same window
shift share them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lora_sam3d.sparse.tensor import SparseTensor

__all__ = ["MultiHeadRMSNorm", "SparseMultiHeadAttention", "grouped_attention", "window_ids"]


@dataclass
class _Pack:
    token: torch.Tensor  # (M,) rows of the sparse tensor in this pack
    slot: torch.Tensor  # (M,) flat position group * length + position-in-group
    groups: int
    length: int
    key_mask: torch.Tensor | None  # (groups, 1, 1, length) bool, None when no padding


@dataclass
class _Plan:
    packs: list[_Pack]
    inverse: torch.Tensor  # (N,) where each row lands in the concatenation of the packs' outputs


def _plan(group_id: torch.Tensor) -> _Plan:
    """Pack rows into padded batches by group; ``group_id`` (N,) int64 need not be contiguous."""
    n = group_id.shape[0]
    if n == 0:
        return _Plan([], group_id.new_zeros(0))
    _, group = torch.unique(group_id, return_inverse=True)
    order = torch.argsort(group, stable=True)
    lengths = torch.bincount(group)
    starts = torch.cumsum(lengths, 0) - lengths
    sorted_group = group[order]
    position = torch.arange(n, device=group.device) - starts[sorted_group]
    padded = torch.pow(2, torch.ceil(torch.log2(lengths.double().clamp_min(1)))).long()
    packs = []
    for length in torch.unique(padded).tolist():
        members = torch.nonzero(padded == length).flatten()
        local = torch.full_like(lengths, -1)
        local[members] = torch.arange(members.numel(), device=group.device)
        take = local[sorted_group] >= 0
        token = order[take]
        slot = local[sorted_group[take]] * length + position[take]
        member_lengths = lengths[members]
        mask = None
        if bool((member_lengths != length).any()):
            mask = (torch.arange(length, device=group.device)[None, :] < member_lengths[:, None])[
                :, None, None, :
            ]
        packs.append(_Pack(token, slot, members.numel(), length, mask))
    inverse = torch.argsort(torch.cat([p.token for p in packs]))
    return _Plan(packs, inverse)


def grouped_attention(qkv: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Attention of each row with the rows of its group. ``qkv`` (N, 3, H, D) -> (N, H, D)."""
    n, _, heads, dim = qkv.shape
    outs = []
    for pack in plan.packs:
        rows = qkv.new_zeros(pack.groups * pack.length, 3, heads, dim).index_copy(
            0, pack.slot, qkv[pack.token]
        )
        q, k, v = rows.view(pack.groups, pack.length, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = pack.key_mask.to(q.device) if pack.key_mask is not None else None
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (groups, H, L, D)
        o = o.transpose(1, 2).reshape(pack.groups * pack.length, heads, dim)
        outs.append(o[pack.slot])
    if not outs:
        return qkv.new_zeros(n, heads, dim)
    return torch.cat(outs)[plan.inverse]


def window_ids(coords: torch.Tensor, window_size: int, shift: int) -> torch.Tensor:
    """(N,) int64 id of the window of each voxel: floor((xyz + shift) / window) within its batch element."""
    c = coords.long()
    w = (c[:, 1:] + shift) // window_size
    extent = int(w.max().item()) + 1 if c.shape[0] else 1
    return ((c[:, 0] * extent + w[:, 0]) * extent + w[:, 1]) * extent + w[:, 2]


class MultiHeadRMSNorm(nn.Module):
    """Per-head RMS normalisation of q or k (SAM 3D's `SparseMultiHeadRMSNorm`), in fp32."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x.float(), dim=-1) * self.gamma * self.scale).to(x.dtype)


class SparseMultiHeadAttention(nn.Module):
    """Self-attention with SAM 3D's parameter names: ``to_qkv``, ``to_out`` (and ``q/k_rms_norm``).

    ``to_qkv`` and ``to_out`` are plain ``nn.Linear`` applied to the feature tensor, as in the
    reference, so LoRA wraps them like any linear.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        attn_mode: str = "full",
        window_size: int | None = None,
        shift_window: int = 0,
        qkv_bias: bool = True,
        qk_rms_norm: bool = False,
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels={channels} is not divisible by num_heads={num_heads}")
        if attn_mode not in ("full", "windowed"):
            raise ValueError(f"attn_mode must be 'full' or 'windowed', got {attn_mode!r}")
        if attn_mode == "windowed" and not window_size:
            raise ValueError("windowed attention needs a window_size")
        self.channels, self.num_heads = channels, num_heads
        self.attn_mode, self.window_size, self.shift_window = attn_mode, window_size, shift_window
        self.qk_rms_norm = qk_rms_norm
        self.to_qkv = nn.Linear(channels, channels * 3, bias=qkv_bias)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(channels // num_heads, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(channels // num_heads, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def _plan(self, x: SparseTensor) -> _Plan:
        if self.attn_mode == "full":
            return x.cached("attn_full", lambda: _plan(x.batch_index))
        ws, shift = self.window_size, self.shift_window
        assert ws is not None
        return x.cached(f"attn_window_{ws}_{shift}", lambda: _plan(window_ids(x.coords, ws, shift)))

    def forward(self, x: SparseTensor) -> SparseTensor:
        n = x.feats.shape[0]
        qkv = self.to_qkv(x.feats).view(n, 3, self.num_heads, -1)
        if self.qk_rms_norm:
            q, k, v = qkv.unbind(1)
            qkv = torch.stack([self.q_rms_norm(q), self.k_rms_norm(k), v], dim=1)
        h = grouped_attention(qkv, self._plan(x))
        return x.replace(self.to_out(h.reshape(n, self.channels)))
