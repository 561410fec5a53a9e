"""Sparse voxel tensors and the layers SAM 3D's mesh decoder is built from, in plain PyTorch."""

from lora_sam3d.sparse.attention import SparseMultiHeadAttention, grouped_attention, window_ids
from lora_sam3d.sparse.conv import SparseConv3d, SparseSubdivide, neighbour_table
from lora_sam3d.sparse.nn import LayerNorm32, SparseGELU, SparseGroupNorm32, SparseLinear, SparseSiLU
from lora_sam3d.sparse.tensor import SparseTensor

__all__ = [
    "LayerNorm32",
    "SparseConv3d",
    "SparseGELU",
    "SparseGroupNorm32",
    "SparseLinear",
    "SparseMultiHeadAttention",
    "SparseSiLU",
    "SparseSubdivide",
    "SparseTensor",
    "grouped_attention",
    "neighbour_table",
    "window_ids",
]
