"""The LoRA layers: `LoRALinear` (with a fused autograd path and partial q/k/v adapters for fused
projections) and `LoRAConv3d`; both keep the wrapped layer's own parameters under their names."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "LoRAConv3d",
    "LoRALayer",
    "LoRALinear",
]


class LoRALayer(nn.Module):
    """What every LoRA layer shares: the wrapped layer's own ``weight``/``bias`` (so base state-dict
    names are unchanged), the scaling, ``lora_A`` (kaiming-uniform) and ``lora_B`` (zero), dropout
    on the LoRA path, and merge/unload back to the wrapped class."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _adopt(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        a_shape: tuple[int, ...],
        b_shape: tuple[int, ...],
    ) -> None:
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        self.rank, self.alpha, self.use_rslora = rank, float(alpha), use_rslora
        self.scaling = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        self.weight = base.weight
        self.bias = base.bias
        # The wrapped module itself (unregistered: its parameters are ours) gives back the right
        # class (e.g. a sparse linear) on merge/unload.
        object.__setattr__(self, "_base", base)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(*a_shape, **factory))
        self.lora_B = nn.Parameter(torch.empty(*b_shape, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A kaiming-uniform, B zero: a fresh adapter leaves the output unchanged."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def merged_weight(self) -> torch.Tensor:
        """``W + s B A`` in the weight's dtype, merged in fp32; the module is not changed."""
        return (self.weight.float() + self.delta_weight()).to(self.weight.dtype)

    def merge(self) -> nn.Module:
        """A new layer of the wrapped class with ``W + s B A`` (merged in fp32, then cast)."""
        merged = copy.deepcopy(self._base)
        merged.weight = nn.Parameter(
            self.merged_weight.detach().clone(), requires_grad=self.weight.requires_grad
        )
        if self.bias is not None:
            merged.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return merged

    def unload(self) -> nn.Module:
        """The wrapped layer, with its base weights (never modified by LoRA)."""
        return self._base  # type: ignore[return-value]


class LoRALinear(LoRALayer):
    """A frozen linear plus a trainable low-rank update, optionally on some slices of its output.

    ``weight`` and ``bias`` are the wrapped layer's own parameters, so state-dict names of the
    base model are unchanged. With ``enabled_slices`` (e.g. ``(True, False, True)`` for q and v of
    a fused qkv projection) the output is split into equal slices, each enabled slice gets its own
    rank-r pair (``lora_A`` is then (r * n_enabled, in) and ``lora_B`` (out / n * n_enabled, r),
    as in loralib's ``MergedLinear``), and disabled slices receive exactly zero update.

    The forward accepts a Tensor (..., in) or any object with ``.feats`` (N, in) and
    ``.replace(feats)``, such as a sparse tensor: the update applies to the features.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 4,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        enabled_slices: tuple[bool, ...] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear (or subclass), got {type(base).__name__}")
        if isinstance(base, LoRALinear):
            raise TypeError("this layer already has LoRA")
        self.in_features = base.in_features
        self.out_features = base.out_features
        if enabled_slices is not None and all(enabled_slices):
            enabled_slices = None
        self.enabled_slices = enabled_slices
        n_groups = 1
        out_lora = self.out_features
        if enabled_slices is not None:
            n = len(enabled_slices)
            if self.out_features % n:
                raise ValueError(f"out_features={self.out_features} does not split into {n} equal slices")
            n_groups = sum(enabled_slices)
            if n_groups == 0:
                raise ValueError("enabled_slices disables every slice")
            out_lora = self.out_features // n * n_groups
            rows = torch.arange(self.out_features).view(n, -1)[list(enabled_slices)].reshape(-1)
            self.register_buffer("_rows", rows, persistent=False)
        self.n_groups = n_groups
        self._adopt(
            base, rank, alpha, dropout, use_rslora, (rank * n_groups, self.in_features), (out_lora, rank)
        )

    def _full_B(self) -> torch.Tensor:
        """B as an (out, r * n_groups) matrix: block-diagonal over enabled slices, zero rows elsewhere."""
        if self.enabled_slices is None:
            return self.lora_B
        blocks = torch.block_diag(*self.lora_B.chunk(self.n_groups, dim=0))
        full = self.lora_B.new_zeros(self.out_features, self.rank * self.n_groups)
        return full.index_copy(0, self._rows, blocks)

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) update ``s * B A``, computed in fp32."""
        return self._full_B().float() @ self.lora_A.float() * self.scaling

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        B = self._full_B()
        if isinstance(self.dropout, nn.Identity) and not torch.is_autocast_enabled(x.device.type):
            out = _FusedLoRA.apply(x2, self.weight, self.bias, self.lora_A, B, self.scaling)
        else:  # dropout or autocast: let autograd compose the pieces
            out = F.linear(x2, self.weight, self.bias)
            low = self.dropout(x2) @ self.lora_A.t().to(x2.dtype)
            out = out.addmm_(low.to(out.dtype), B.t().to(out.dtype), alpha=self.scaling)
        return out.view(*shape[:-1], self.out_features)

    def forward(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return self._linear(x)
        feats = getattr(x, "feats", None)
        if not isinstance(feats, torch.Tensor) or not hasattr(x, "replace"):
            raise TypeError(
                f"LoRALinear takes a Tensor or an object with .feats and .replace(), got {type(x).__name__}"
            )
        return x.replace(self._linear(feats))

    def extra_repr(self) -> str:
        slices = "" if self.enabled_slices is None else f", slices={self.enabled_slices}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, scaling={self.scaling:.4g}{slices}"
        )


class _FusedLoRA(torch.autograd.Function):
    """``x W^T + b + s (x A^T) B^T`` with a hand-written backward.

    Autograd on the composed ops would make two full-size input gradients and add them, and read
    the upstream gradient in a transposed layout; here the LoRA input gradient is accumulated into
    the base one with one ``addmm_``. Keeps LoRA's fwd+bwd within a few % of the frozen layer's.
    """

    @staticmethod
    def forward(ctx: Any, x, weight, bias, lora_A, lora_B, scaling: float):  # type: ignore[override]
        out = F.linear(x, weight, bias)
        low = x @ lora_A.t()
        out.addmm_(low, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_A, lora_B, low)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        x, weight, lora_A, lora_B, low = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_w, need_b, need_a, need_bb, _ = ctx.needs_input_grad
        grad_x = grad_w = grad_b = grad_a = grad_bb = None
        grad_low = grad @ lora_B if (need_x or need_a) else None
        if need_x:
            grad_x = (grad @ weight).addmm_(grad_low, lora_A, alpha=s)
        if need_w:
            grad_w = grad.t() @ x
        if need_b and ctx.has_bias:
            grad_b = grad.sum(0)
        if need_a:
            grad_a = (grad_low.t() @ x).mul_(s)
        if need_bb:
            grad_bb = torch.mm(low.t(), grad).t().mul_(s)
        return grad_x, grad_w, grad_b, grad_a, grad_bb, None


class LoRAConv3d(LoRALayer):
    """A frozen ``nn.Conv3d`` plus a trainable low-rank update ``s * B(A(x))``.

    ``lora_A`` (r, in/groups, k, k, k) convolves with the base's kernel, stride, padding and
    dilation; ``lora_B`` (out, r, 1, 1, 1) mixes the r channels back. ``weight``/``bias`` are the
    wrapped layer's own, so base state-dict names are unchanged.
    """

    def __init__(
        self,
        base: nn.Conv3d,
        rank: int = 4,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Conv3d) or isinstance(base, LoRAConv3d):
            raise TypeError(f"LoRAConv3d wraps an nn.Conv3d, got {type(base).__name__}")
        if base.groups != 1:
            raise ValueError("LoRAConv3d supports groups=1 convolutions only")
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.enabled_slices = None
        a_shape, b_shape = (rank, self.in_channels, *base.kernel_size), (self.out_channels, rank, 1, 1, 1)
        self._adopt(base, rank, alpha, dropout, use_rslora, a_shape, b_shape)

    def delta_weight(self) -> torch.Tensor:
        """The (out, in, k, k, k) update ``s * B A``, in fp32."""
        a = self.lora_A.float().flatten(1)
        return (self.lora_B.float().flatten(1) @ a).view_as(self.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base: nn.Conv3d = self._base  # type: ignore[assignment]
        out = F.conv3d(x, self.weight, self.bias, base.stride, base.padding, base.dilation)
        low = F.conv3d(
            self.dropout(x), self.lora_A.to(x.dtype), None, base.stride, base.padding, base.dilation
        )
        return out + F.conv3d(low, self.lora_B.to(x.dtype)) * self.scaling

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, rank={self.rank}, "
            f"alpha={self.alpha}, scaling={self.scaling:.4g}"
        )
