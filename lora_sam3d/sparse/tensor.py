"""The sparse voxel tensor the decoder works on: integer coordinates plus features, in plain PyTorch.

SAM 3D's own `SparseTensor` wraps spconv, whose CPU backward does not run; ours is a thin pair of
tensors so that everything built on it runs and backpropagates on any device. Rows of one batch
element are contiguous (as in the reference). Coordinate-derived structures (neighbour maps,
attention windows) are cached in a dict shared by every tensor with the same coordinates, like
spconv's `indice_key`, so each is built once per resolution and reused by all layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["SparseTensor"]


class SparseTensor:
    """Features on occupied voxels.

    Args:
        feats: (N, ...) features; extra dims allowed (attention packs (N, 3, H, D)).
        coords: (N, 4) int32 ``batch, x, y, z``; rows of one batch element contiguous, batch
            indices non-decreasing.
        batch_size: number of batch elements (default: last batch index + 1); an element may be
            empty.
    """

    __slots__ = ("_cache", "batch_size", "coords", "feats")

    def __init__(
        self,
        feats: torch.Tensor,
        coords: torch.Tensor,
        batch_size: int | None = None,
        *,
        _cache: dict[str, Any] | None = None,
        _checked: bool = False,
    ) -> None:
        if not _checked:
            _validate(feats, coords)
            coords = coords.to(torch.int32)
        self.feats = feats
        self.coords = coords
        if batch_size is None:
            batch_size = int(coords[-1, 0].item()) + 1 if coords.shape[0] else 0
        self.batch_size = batch_size
        self._cache = {} if _cache is None else _cache

    # -- structure ------------------------------------------------------------------------------
    def replace(self, feats: torch.Tensor) -> SparseTensor:
        """Same coordinates (and cache), new features."""
        if feats.shape[0] != self.feats.shape[0]:
            raise ValueError(
                f"replace: got {feats.shape[0]} feature rows for {self.feats.shape[0]} coordinates"
            )
        return SparseTensor(feats, self.coords, self.batch_size, _cache=self._cache, _checked=True)

    def cached(self, key: str, build: Callable[[], Any]) -> Any:
        """A coordinate-derived value, built once and shared with every tensor of these coordinates."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def batch_index(self) -> torch.Tensor:
        """(N,) int64 batch index of each row."""
        return self.cached("batch_index", lambda: self.coords[:, 0].long())

    @property
    def layout(self) -> list[slice]:
        """Row slice of each batch element."""

        def build() -> list[slice]:
            counts = torch.bincount(self.batch_index, minlength=self.batch_size).tolist()
            out, start = [], 0
            for n in counts:
                out.append(slice(start, start + n))
                start += n
            return out

        return self.cached("layout", build)

    # -- tensor-like --------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size([self.batch_size, *self.feats.shape[1:]])

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def device(self) -> torch.device:
        return self.feats.device

    def to(self, *args: Any, **kwargs: Any) -> SparseTensor:
        """Move/cast like ``Tensor.to``; coordinates follow the device and stay int32."""
        feats = self.feats.to(*args, **kwargs)
        if feats.device == self.coords.device:
            return self.replace(feats)
        return SparseTensor(feats, self.coords.to(feats.device), self.batch_size, _checked=True)

    def type(self, dtype: torch.dtype) -> SparseTensor:
        return self if dtype == self.dtype else self.replace(self.feats.to(dtype))

    def float(self) -> SparseTensor:
        return self.type(torch.float32)

    def _binary(self, other: Any, op: Callable[[torch.Tensor, Any], torch.Tensor]) -> SparseTensor:
        if isinstance(other, SparseTensor):
            if other.coords is not self.coords and not torch.equal(other.coords, self.coords):
                raise ValueError("sparse tensors with different coordinates cannot be combined")
            other = other.feats
        return self.replace(op(self.feats, other))

    def __add__(self, other: Any) -> SparseTensor:
        return self._binary(other, torch.add)

    __radd__ = __add__

    def __mul__(self, other: Any) -> SparseTensor:
        return self._binary(other, torch.mul)

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return (
            f"SparseTensor(n={self.feats.shape[0]}, batch_size={self.batch_size}, "
            f"feats={tuple(self.feats.shape)} {self.dtype}, device={self.device})"
        )


def _validate(feats: torch.Tensor, coords: torch.Tensor) -> None:
    if not isinstance(feats, torch.Tensor) or not isinstance(coords, torch.Tensor):
        raise TypeError("SparseTensor(feats=..., coords=...) takes two tensors")
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError(f"coords must be (N, 4) = batch, x, y, z; got shape {tuple(coords.shape)}")
    if coords.dtype.is_floating_point or coords.dtype == torch.bool:
        raise TypeError(f"coords must be an integer tensor, got {coords.dtype}")
    if feats.shape[0] != coords.shape[0]:
        raise ValueError(f"feats has {feats.shape[0]} rows but coords has {coords.shape[0]}")
    if coords.shape[0] == 0:
        return
    if bool((coords < 0).any()):
        raise ValueError("coords must be non-negative")
    if bool((coords[1:, 0] < coords[:-1, 0]).any()):
        raise ValueError("coords must be sorted by batch index (rows of one batch element contiguous)")
