"""Sparse ops against dense PyTorch definitions: convolution, group norm, attention, subdivision."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lora_sam3d.sparse import (
    SparseConv3d,
    SparseGroupNorm32,
    SparseMultiHeadAttention,
    SparseSubdivide,
    SparseTensor,
    grouped_attention,
    neighbour_table,
    window_ids,
)
from lora_sam3d.sparse.attention import _plan
from lora_sam3d.sparse.conv import _SubMConv


def random_sparse(
    batch: int = 2, res: int = 10, p: float = 0.3, channels: int = 6, seed: int = 0
) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    occ = torch.rand(batch, res, res, res, generator=g) < p
    occ[1:, : res // 2] = False  # batch elements of different size
    coords = torch.nonzero(occ).int()
    return SparseTensor(torch.randn(coords.shape[0], channels, generator=g, dtype=torch.float64), coords)


def to_dense(x: SparseTensor, res: int) -> torch.Tensor:
    c = x.coords.long()
    dense = x.feats.new_zeros(x.batch_size, x.feats.shape[1], res, res, res)
    dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = x.feats
    return dense


def test_submanifold_conv_equals_dense_conv_at_active_sites() -> None:
    x = random_sparse()
    conv = SparseConv3d(6, 5, 3).double()
    out = conv(x)
    weight = conv.conv.weight.permute(0, 4, 1, 2, 3)  # (out, in, kx, ky, kz)
    dense = F.conv3d(to_dense(x, 10), weight, conv.conv.bias, padding=1)
    c = x.coords.long()
    expected = dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]
    torch.testing.assert_close(out.feats, expected)
    assert out.coords is x.coords
    one = SparseConv3d(6, 4, 1).double()
    # spconv's 1x1x1 path reads the (out, 1, 1, 1, in) memory as (in, out); so do we.
    torch.testing.assert_close(one(x).feats, x.feats @ one.conv.weight.reshape(6, 4) + one.conv.bias)


def test_submanifold_conv_gradients() -> None:
    x = random_sparse(res=5, channels=3)
    table = neighbour_table(x.coords, 3)
    weight = torch.randn(2, 3, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    feats = x.feats.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda f, w, b: _SubMConv.apply(f, w, b, table), (feats, weight, bias))


def test_neighbour_table_finds_offsets() -> None:
    coords = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 2], [0, 2, 1, 1], [1, 1, 1, 2]], dtype=torch.int32)
    table = neighbour_table(coords, 3)
    n = 4
    assert table[0, 13] == 0  # centre
    assert table[0, 14] == 1  # dz = +1
    assert table[0, 22] == 2  # dx = +1: (1+1)*9 + 1*3 + 1
    assert table[1, 12] == 0  # dz = -1
    assert (table[3] == n).sum() == 26, "another batch element is never a neighbour"


def test_group_norm_per_batch_element() -> None:
    x = random_sparse(channels=8)
    norm = SparseGroupNorm32(4, 8).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    out = norm(x)
    for sl in x.layout:
        ref = F.group_norm(x.feats[sl].T[None], 4, norm.weight, norm.bias, norm.eps)[0].T
        torch.testing.assert_close(out.feats[sl], ref, rtol=1e-5, atol=1e-5)  # fp32 inside, as the reference


def dense_group_attention(qkv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    q, k, v = qkv.unbind(1)  # (N, H, D)
    scores = torch.einsum("nhd,mhd->hnm", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(groups[None, :, None] != groups[None, None, :], float("-inf"))
    return torch.einsum("hnm,mhd->nhd", scores.softmax(-1), v)


@pytest.mark.parametrize("shift", [0, 4])
def test_windowed_attention_equals_masked_dense(shift: int) -> None:
    x = random_sparse(res=12, p=0.2)
    qkv = torch.randn(x.feats.shape[0], 3, 2, 4, dtype=torch.float64)
    ids = window_ids(x.coords, 8, shift)
    plan = _plan(ids)
    lengths = sorted({p.length for p in plan.packs})
    assert len(lengths) > 1, "the input should exercise several padded lengths"
    torch.testing.assert_close(grouped_attention(qkv, plan), dense_group_attention(qkv, ids))
    # window membership: same batch element and same floor((xyz + shift) / 8)
    c = x.coords.long()
    key = torch.cat([c[:, :1], (c[:, 1:] + shift) // 8], 1)
    same = (key[:, None] == key[None]).all(-1)
    assert torch.equal(same, ids[:, None] == ids[None])


def test_attention_module_full_mode_and_grad() -> None:
    x = random_sparse(res=6, channels=8)
    attn = SparseMultiHeadAttention(8, 2, attn_mode="full").double()
    out = attn(x)
    qkv = attn.to_qkv(x.feats).view(-1, 3, 2, 4)
    ref = attn.to_out(dense_group_attention(qkv, x.batch_index).reshape(-1, 8))
    torch.testing.assert_close(out.feats, ref)
    out.feats.pow(2).sum().backward()
    assert attn.to_qkv.weight.grad is not None and attn.to_qkv.weight.grad.abs().sum() > 0


def test_subdivide_order_and_cache() -> None:
    x = random_sparse(res=4)
    sub = SparseSubdivide()
    y = sub(x)
    assert y.feats.shape[0] == 8 * x.feats.shape[0]
    assert torch.equal(y.coords[:8, 1:] - 2 * x.coords[0, 1:], torch.tensor(
        [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.int32
    ))  # fmt: skip
    assert torch.equal(y.feats[8:16], x.feats[1:2].expand(8, -1))
    z = sub(x.replace(x.feats * 2))
    assert z.coords is y.coords and z._cache is y._cache, (
        "subdividing the same coordinates shares the structure"
    )


def test_sparse_tensor_validation() -> None:
    with pytest.raises(ValueError, match=r"coords must be \(N, 4\)"):
        SparseTensor(torch.zeros(3, 2), torch.zeros(3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="sorted by batch"):
        SparseTensor(torch.zeros(2, 2), torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="feats has 3 rows but coords has 2"):
        SparseTensor(torch.zeros(3, 2), torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="integer"):
        SparseTensor(torch.zeros(2, 2), torch.zeros(2, 4))


def test_neighbour_table_dense_and_sorted_lookup_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_sam3d.sparse import conv

    x = random_sparse(res=9, p=0.4)
    dense = neighbour_table(x.coords, 3)
    monkeypatch.setattr(conv, "_DENSE_LOOKUP_CELLS", 0)
    assert torch.equal(neighbour_table(x.coords, 3), dense)


def test_subdivided_conv_equals_conv_of_subdivision() -> None:
    x = random_sparse(res=6, p=0.3)
    conv = SparseConv3d(6, 5, 3).double()
    expected = conv(SparseSubdivide()(x))
    got = conv.forward_subdivided(x)
    assert torch.equal(got.coords, expected.coords)
    torch.testing.assert_close(got.feats, expected.feats)
