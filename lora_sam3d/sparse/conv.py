"""Submanifold sparse 3D convolution and x2 subdivision, in plain PyTorch.

Written by hand because no maintained library does a trainable submanifold convolution on the
CPU: spconv's CPU backward calls into CUDA, and MinkowskiEngine / torchsparse need their own
compiled extensions. The convolution matches spconv's `SubMConv3d` exactly (weights stored as
spconv does, (out, k, k, k, in); ``W[dx+1, dy+1, dz+1]`` acts on the neighbour at offset
(+dx, +dy, +dz); output rows in input order; a 1x1x1 kernel's memory read as (in, out), as
spconv's 1x1 path does): a neighbour table (N, k^3) is built once per
coordinate set by sorting linearised coordinates and binary search, cached on the tensor, then
each chunk of rows is gathered into an im2col block and multiplied in one GEMM. The backward is
hand-written so that only the input features and the table are kept for it, not the gathered
blocks; its input gradient is the transposed convolution, gathered through the same table.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lora_sam3d.sparse.tensor import SparseTensor

__all__ = ["SparseConv3d", "SparseSubdivide", "neighbour_table"]

# Rows per im2col chunk are chosen so one gathered block stays near this many elements.
_CHUNK_ELEMENTS = 1 << 24
# Neighbour lookup through a dense index volume up to this many cells (int64: 256 MiB), else sorting.
_DENSE_LOOKUP_CELLS = 1 << 25


def neighbour_table(coords: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(N, k^3) int64: row index of the neighbour at each kernel offset, or N where there is none.

    Offsets are ordered (dx, dy, dz) with dz fastest, dx, dy, dz in [-k//2, k//2], which is the
    flattening order of spconv's (out, k, k, k, in) weight.
    """
    n = coords.shape[0]
    r = kernel_size // 2
    c = coords.long()
    size = int(c[:, 1:].max().item()) + 2 * r + 1 if n else 1
    key = ((c[:, 0] * size + c[:, 1] + r) * size + c[:, 2] + r) * size + c[:, 3] + r
    d = torch.arange(-r, r + 1, device=coords.device)
    dx, dy, dz = torch.meshgrid(d, d, d, indexing="ij")
    delta = ((dx * size + dy) * size + dz).reshape(-1)
    query = key[:, None] + delta[None, :]
    cells = (int(c[-1, 0].item()) + 1) * size**3 if n else 0
    if cells <= _DENSE_LOOKUP_CELLS:  # a dense index volume: one gather
        volume = torch.full((cells,), n, dtype=torch.long, device=coords.device)
        volume[key] = torch.arange(n, device=coords.device)
        return volume[query]
    sorted_key, perm = torch.sort(key)  # large grids: binary search in the sorted keys
    pos = torch.searchsorted(sorted_key, query).clamp_max(max(n - 1, 0))
    return torch.where(sorted_key[pos] == query, perm[pos], torch.full_like(pos, n))


def _chunks(n: int, width: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


class _SubMConv(torch.autograd.Function):
    """out[i] = b + sum_k W_k x[table[i, k]]  (missing neighbours contribute zero)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor
    ):  # type: ignore[override]
        n, cin = x.shape
        cout, kk = weight.shape[0], table.shape[1]
        w2 = weight.reshape(cout, kk * cin)
        x_pad = torch.cat([x, x.new_zeros(1, cin)])
        out = x.new_empty(n, cout)
        for rows in _chunks(n, kk * cin):
            cols = x_pad.index_select(0, table[rows].reshape(-1)).view(-1, kk * cin)
            if bias is not None:
                torch.addmm(bias, cols, w2.t(), out=out[rows])
            else:
                torch.mm(cols, w2.t(), out=out[rows])
        ctx.save_for_backward(x, weight, table)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        x, weight, table = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        n, cin = x.shape
        cout, kk = weight.shape[0], table.shape[1]
        w2 = weight.reshape(cout, kk * cin)
        grad = grad.contiguous()
        grad_w2 = torch.zeros_like(w2) if need_w else None
        if need_w:
            x_pad = torch.cat([x, x.new_zeros(1, cin)])
            for rows in _chunks(n, kk * cin):
                cols = x_pad.index_select(0, table[rows].reshape(-1)).view(-1, kk * cin)
                grad_w2.addmm_(grad[rows].t(), cols)
        grad_x = None
        if need_x:
            # The input gradient is itself a submanifold convolution: j is i's neighbour at offset d
            # exactly when i is j's at -d, which is column kk-1-k of the symmetric kernel's table.
            # So grad_x[j] = sum_k W[kk-1-k]^T grad[table[j, k]]: a gather and one GEMM per chunk
            # (a scatter-add of N * k^3 rows was a fifth of the demo's training step).
            w_t = weight.reshape(cout, kk, cin).flip(1).transpose(0, 1).reshape(kk * cout, cin)
            grad_pad = torch.cat([grad, grad.new_zeros(1, cout)])
            grad_x = x.new_empty(n, cin)
            for rows in _chunks(n, kk * cout):
                cols = grad_pad.index_select(0, table[rows].reshape(-1)).view(-1, kk * cout)
                torch.mm(cols, w_t, out=grad_x[rows])
        grad_w = grad_w2.view_as(weight) if need_w else None
        grad_b = grad.sum(0) if (need_b and ctx.has_bias) else None
        return grad_x, grad_w, grad_b, None


class _ConvParams(nn.Module):
    """Holds ``weight`` (out, k, k, k, in) and ``bias`` (out,) under the name ``conv``, as spconv does."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool) -> None:
        super().__init__()
        k = kernel_size
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.weight = nn.Parameter(torch.empty(out_channels, k, k, k, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        fan_in = in_channels * k**3
        bound = 1 / fan_in**0.5
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)


class SparseConv3d(nn.Module):
    """Submanifold convolution (stride 1, output on the input's voxels), odd kernel size.

    Parameters live in ``self.conv`` as in the reference (``<name>.conv.weight`` shaped
    (out, k, k, k, in)), so SAM 3D state dicts load without conversion.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"submanifold convolution needs an odd kernel size, got {kernel_size}")
        self.conv = _ConvParams(in_channels, out_channels, kernel_size, bias)

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: SparseTensor) -> SparseTensor:
        k = self.conv.kernel_size
        weight, bias = self.conv.weight, self.conv.bias
        feats = x.feats
        device = feats.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else feats.dtype
        feats, weight = feats.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        if k == 1:
            # spconv (FILTER_HWIO = False) computes a 1x1x1 conv as ``x @ weight.view(in, out)``:
            # the (out, 1, 1, 1, in) tensor's memory is read as (in, out). Checkpoints trained with
            # spconv carry that meaning, so we read it the same way.
            flat = weight.reshape(self.conv.in_channels, self.conv.out_channels)
            out = torch.addmm(bias, feats, flat) if bias is not None else feats @ flat
        else:
            table = x.cached(f"submconv_table_{k}", lambda: neighbour_table(x.coords, k))
            out = _SubMConv.apply(feats, weight, bias, table)
        return x.replace(out)

    def forward_subdivided(self, x: SparseTensor) -> SparseTensor:
        """``self(subdivide(x))`` computed on the parent voxels, 8x less gathering.

        Children of one parent share its features and every child of an occupied parent exists,
        so the child at 2p + o sees, through kernel offset d, the parent p + floor((o + d) / 2).
        The 3x3x3 kernel thus folds into eight 3x3x3 kernels on the parent grid, one per child
        position; the result is laid out in `SparseSubdivide`'s child order.
        """
        if self.conv.kernel_size != 3:
            raise ValueError("forward_subdivided needs a 3x3x3 kernel")
        feats, weight, bias = x.feats, self.conv.weight, self.conv.bias
        device = feats.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else feats.dtype
        cout, cin = self.conv.out_channels, self.conv.in_channels
        folding = x.cached("subdivision_map", lambda: _subdivision_map(feats.device)).to(dtype)
        folded = torch.einsum("oed,cdi->ocei", folding, weight.to(dtype).reshape(cout, 27, cin))
        folded_bias = bias.to(dtype).repeat(8) if bias is not None else None
        table = x.cached("submconv_table_3", lambda: neighbour_table(x.coords, 3))
        out = _SubMConv.apply(feats.to(dtype), folded.reshape(8 * cout, 27, cin), folded_bias, table)
        children = SparseSubdivide()(x.replace(feats[:, :0]))
        return children.replace(out.reshape(-1, cout))


def _subdivision_map(device: torch.device) -> torch.Tensor:
    """(8, 27, 27) 0/1: child offset o, parent offset e, kernel offset d with floor((o + d) / 2) == e per axis."""
    o = torch.stack(torch.meshgrid(*[torch.arange(2)] * 3, indexing="ij"), -1).reshape(8, 1, 3)
    d = torch.stack(torch.meshgrid(*[torch.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(1, 27, 3)
    e = torch.div(o + d, 2, rounding_mode="floor") + 1  # (8, 27, 3) in {0, 1, 2}
    e_index = (e[..., 0] * 9 + e[..., 1] * 3 + e[..., 2]).long()  # (8, 27_d)
    return F.one_hot(e_index, 27).permute(0, 2, 1).float().to(device)  # (8, 27_e, 27_d)


class SparseSubdivide(nn.Module):
    """Each voxel becomes its 8 children at twice the resolution, features copied (nearest).

    Child order follows the reference: parent i gives rows 8i..8i+7 at offsets (0,0,0), (0,0,1),
    (0,1,0), ... (z fastest), so batch contiguity is kept.
    """

    def forward(self, x: SparseTensor) -> SparseTensor:
        def build() -> torch.Tensor:
            d = torch.arange(2, device=x.coords.device, dtype=torch.int32)
            off = torch.stack(torch.meshgrid(d, d, d, indexing="ij"), dim=-1).reshape(8, 3)
            off = torch.cat([torch.zeros(8, 1, dtype=torch.int32, device=off.device), off], dim=1)
            parent = x.coords.clone()
            parent[:, 1:] *= 2
            return (parent[:, None, :] + off[None]).reshape(-1, 4)

        child_coords = x.cached("subdivide_coords", build)
        child_cache = x.cached("subdivide_cache", dict)
        feats = x.feats.repeat_interleave(8, dim=0)
        return SparseTensor(feats, child_coords, x.batch_size, _cache=child_cache, _checked=True)
