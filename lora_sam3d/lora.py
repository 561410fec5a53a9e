"""Low-rank adapters (LoRA) for the linears of the mesh decoder and the convolutions of stage 1.

Why a module of our own instead of PEFT: the decoder's linears take sparse tensors (a `SparseLinear`
is an `nn.Linear` whose forward receives an object with `.feats`), SAM 3D fuses q, k and v into one
`to_qkv` projection that we want to adapt partially, and the adapter must keep the base model's
state-dict names so that Meta's checkpoints load into an injected model unchanged. The files we
write use PEFT's layout (`adapter_model.safetensors` + `adapter_config.json`), so `peft` reads them.

The layer keeps the wrapped layer's `weight` and `bias` parameters as its own (same tensors, no
copy), adds `lora_A` (r, in) and `lora_B` (out, r), and computes
``W x + b + s * B (A dropout(x))`` with ``s = alpha / r`` (or ``alpha / sqrt(r)``, rsLoRA) in one
fused ``addmm`` on the base output, so no full-size temporary is made for the LoRA path.
`LoRAConv3d` does the same for the dense 3D convolutions of the sparse-structure stage, as PEFT
does for convolutions: ``lora_A`` is a convolution with the base's kernel (r, in, k, k, k) and
``lora_B`` a 1x1x1 convolution (out, r, 1, 1, 1), so its files are PEFT's too.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from lora_sam3d.atomic import atomic_write

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "LoRAConfig",
    "LoRAConv3d",
    "LoRALayer",
    "LoRALinear",
    "LoadResult",
    "base_fingerprint",
    "count_parameters",
    "freeze_base_params",
    "get_lora_params",
    "get_lora_state_dict",
    "has_lora",
    "inject_lora",
    "load_adapter",
    "load_lora_state_dict",
    "lora_layers",
    "merge_lora_weights",
    "read_adapter_config",
    "save_adapter",
    "setup_lora_for_medical_finetuning",
    "state_dict_fit",
    "unload_lora",
]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."
_QKV = ("q", "k", "v")

Selector = list[str] | tuple[str, ...] | str | Callable[[str, nn.Module], bool]


@dataclass
class LoRAConfig:
    """What to adapt and how; a plain dataclass so LightningCLI/jsonargparse builds it from YAML.

    Args:
        rank: LoRA rank r (> 0).
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with
            ``use_rslora``).
        dropout: dropout probability on the LoRA path's input (training only).
        target_modules: a list of substrings of the full module name (``["to_qkv", "to_out"]``),
            one regular expression full-matched against the name, or (from Python) a callable
            ``(name, module) -> bool``.
        exclude_modules: the same forms; matching modules are skipped.
        rank_pattern / alpha_pattern: per-module overrides, PEFT's semantics: a key ``k`` applies to
            a module whose full name matches ``(.*\\.)?k`` (so ``blocks.0.attn.to_qkv`` or just
            ``to_out``); the first matching key in insertion order wins.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        qkv_slices: which of the q, k, v slices of a fused projection get an adapter
            (e.g. ``["q", "v"]``); the others get exactly zero update.
        fused_qkv_modules: substrings that mark a module as a fused q/k/v projection.
    """

    rank: int = 4
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str | Callable[[str, nn.Module], bool] = field(
        default_factory=lambda: ["to_qkv", "to_out"]
    )
    exclude_modules: list[str] | str | Callable[[str, nn.Module], bool] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    qkv_slices: list[str] = field(default_factory=lambda: list(_QKV))
    fused_qkv_modules: list[str] = field(default_factory=lambda: ["to_qkv"])

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        for key, value in [
            ("rank", self.rank),
            *[(f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items()],
        ]:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LoRAConfig.{key} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        bad = [s for s in self.qkv_slices if s not in _QKV]
        if bad or not self.qkv_slices or len(set(self.qkv_slices)) != len(self.qkv_slices):
            raise ValueError(
                f"LoRAConfig.qkv_slices must be a non-empty subset of {list(_QKV)} without repeats, "
                f"got {self.qkv_slices!r}"
            )
        if not self.target_modules:
            raise ValueError("LoRAConfig.target_modules is empty: name at least one module to adapt")

    def rank_for(self, name: str) -> int:
        return _pattern_value(self.rank_pattern, name, self.rank)

    def alpha_for(self, name: str) -> float:
        return float(_pattern_value(self.alpha_pattern, name, self.alpha))

    def slices_for(self, name: str) -> tuple[bool, ...] | None:
        """Enabled q/k/v slices for a fused projection, or None for an ordinary linear."""
        if any(s in name for s in self.fused_qkv_modules) and len(self.qkv_slices) < 3:
            return tuple(s in self.qkv_slices for s in _QKV)
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoRAConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LoRAConfig keys {unknown}; expected some of {sorted(known)}")
        return cls(**dict(data))


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default


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


ADAPTABLE_TYPES = (nn.Linear, nn.Conv3d)


# ----------------------------------------------------------------------------------------------
# Finding and replacing modules


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALayer) for m in model.modules())


def _compile_selector(selector: Selector | None) -> Callable[[str, nn.Module], bool] | None:
    if selector is None:
        return None
    if callable(selector):
        return selector
    if isinstance(selector, str):
        regex = re.compile(selector)
        return lambda name, _m: regex.fullmatch(name) is not None
    subs = list(selector)
    return lambda name, _m: any(s in name for s in subs)


def _exact_names(names: Iterable[str]) -> str:
    """A regular expression that full-matches exactly these module names."""
    return "|".join(re.escape(n) for n in sorted(names))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def inject_lora(model: nn.Module, config: LoRAConfig | None = None, **fields: Any) -> list[str]:
    """Replace the selected linears (`LoRALinear`) and 3D convolutions (`LoRAConv3d`) of ``model`` in
    place; return their names.

    Pass a `LoRAConfig`, or its fields as keywords (``inject_lora(model, target_modules=['to_qkv',
    'to_out'], rank=4, alpha=8)`` is ``inject_lora(model, LoRAConfig(target_modules=..., rank=4,
    alpha=8))``), not both. From Python, ``target_modules`` / ``exclude_modules`` may also be a
    callable ``(name, module) -> bool``. Raises ``ValueError`` when nothing matches, when a match is
    already a LoRA layer (no double wrap), and ``TypeError`` when a match is not an ``nn.Linear`` or
    ``nn.Conv3d``; the messages list the names and types.
    """
    if config is not None and fields:
        raise TypeError(
            f"inject_lora: pass a LoRAConfig or its fields as keywords, not both (got {sorted(fields)})"
        )
    config = config if config is not None else LoRAConfig(**fields)
    leaves = _adaptable_matches(model, config)
    for name, module in leaves:
        rank, alpha = config.rank_for(name), config.alpha_for(name)
        if isinstance(module, nn.Conv3d):
            layer: nn.Module = LoRAConv3d(module, rank, alpha, config.dropout, config.use_rslora)
        else:
            layer = LoRALinear(
                module, rank, alpha, config.dropout, config.use_rslora, config.slices_for(name)
            )
        _set_submodule(model, name, layer)
    model._lora_config = config  # type: ignore[assignment]
    return [n for n, _ in leaves]


def _adaptable_matches(model: nn.Module, config: LoRAConfig) -> list[tuple[str, nn.Module]]:
    """The linears and 3D convolutions ``config`` selects in ``model``, or the error `inject_lora`
    documents."""
    select = _compile_selector(config.target_modules)
    exclude = _compile_selector(config.exclude_modules)
    assert select is not None
    inside_lora = {f"{n}." for n in lora_layers(model)}
    matches: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside_lora):
            continue
        if select(name, module) and not (exclude is not None and exclude(name, module)):
            matches.append((name, module))
    if not matches:
        linears = [n for n, m in model.named_modules() if isinstance(m, ADAPTABLE_TYPES)]
        raise ValueError(
            f"inject_lora: no module matched target_modules={config.target_modules!r} "
            f"(exclude={config.exclude_modules!r}); linear layers in this model: {linears[:12]}"
            + (" ..." if len(linears) > 12 else "")
        )
    already = [n for n, m in matches if isinstance(m, LoRALayer)]
    if already:
        raise ValueError(f"inject_lora: these modules already have LoRA (call unload_lora first): {already}")
    # A substring such as "mlp" also matches containers and their activations: wrap the linears,
    # skip containers and anything inside a matched container, reject other matched layers.
    matched = {n for n, _ in matches}
    leaves, wrong = [], []
    for name, module in matches:
        if isinstance(module, ADAPTABLE_TYPES):
            leaves.append((name, module))
        elif not any(isinstance(m, ADAPTABLE_TYPES) for m in module.modules()) and not any(
            name.startswith(f"{other}.") for other in matched
        ):
            wrong.append((name, type(module).__name__))
    if wrong:
        raise TypeError(f"inject_lora: matched modules that are not nn.Linear or nn.Conv3d layers: {wrong}")
    if not leaves:
        raise ValueError(
            f"inject_lora: target_modules={config.target_modules!r} matched no nn.Linear or nn.Conv3d, "
            f"only {sorted(matched)}"
        )
    return leaves


def _replace_lora_layers(model: nn.Module, make: Callable[[Any], nn.Module]) -> nn.Module:
    for name, layer in lora_layers(model).items():
        _set_submodule(model, name, make(layer))
    if hasattr(model, "_lora_config"):
        del model._lora_config
    return model


def merge_lora_weights(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Replace every LoRA layer by a plain layer holding ``W + s B A`` (merged in fp32).

    ``inplace=False`` merges a deep copy and leaves ``model`` untouched. Returns the merged model.
    """
    target = model if inplace else copy.deepcopy(model)
    return _replace_lora_layers(target, lambda layer: layer.merge())


def unload_lora(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Remove every LoRA layer, restoring the wrapped layers with their base weights."""
    target = model if inplace else copy.deepcopy(model)
    return _replace_lora_layers(target, lambda layer: layer.unload())


# ----------------------------------------------------------------------------------------------
# Parameters


def _is_lora_name(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("lora_A", "lora_B")


def freeze_base_params(model: nn.Module) -> None:
    """Only LoRA parameters stay trainable."""
    for name, param in model.named_parameters():
        param.requires_grad_(_is_lora_name(name))


def get_lora_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if _is_lora_name(n)]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{'total', 'trainable', 'lora'}`` parameter counts (shared tensors counted once)."""
    total = trainable = lora = 0
    for name, param in model.named_parameters():
        n = param.numel()
        total += n
        trainable += n if param.requires_grad else 0
        lora += n if _is_lora_name(name) else 0
    return {"total": total, "trainable": trainable, "lora": lora}


def setup_lora_for_medical_finetuning(
    model: nn.Module,
    rank: int = 4,
    alpha: float = 8.0,
    dropout: float = 0.0,
    unfreeze_output_layers: bool = True,
    *,
    config: LoRAConfig | None = None,
    target_modules: Selector | None = None,
    output_layers: Iterable[str] = ("out_layer",),
) -> dict[str, int]:
    """Inject LoRA, freeze the base, optionally unfreeze the output head; return parameter counts.

    ``config`` (if given) takes precedence over ``rank``/``alpha``/``dropout``. ``output_layers``
    are module names (exact, or ending in ``.name``) whose parameters are made trainable.
    """
    if config is None:
        config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout)
    if target_modules is not None:
        config = replace(config, target_modules=target_modules)
    inject_lora(model, config)
    freeze_base_params(model)
    if unfreeze_output_layers:
        wanted = list(output_layers)
        found = [
            n for n, _ in model.named_modules() if n and any(n == w or n.endswith(f".{w}") for w in wanted)
        ]
        if not found:
            raise ValueError(f"output_layers {wanted} not found in the model")
        for n in found:
            for p in model.get_submodule(n).parameters():
                p.requires_grad_(True)
    return count_parameters(model)


# ----------------------------------------------------------------------------------------------
# State dicts and adapter files


def get_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, keyed ``<module>.lora_A`` (r, in) / ``<module>.lora_B`` (out, r)."""
    return {k: v for k, v in model.state_dict().items() if _is_lora_name(k)}


class LoadResult(NamedTuple):
    """How a state dict fits a model: keys it lacks, keys it has in excess, tensors of another shape."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    def describe(self, limit: int = 10) -> str:
        """``missing keys [...]; unexpected keys [...]; mis-shaped keys [...]`` (non-empty parts only)."""
        parts = (("missing", self.missing), ("unexpected", self.unexpected), ("mis-shaped", self.mismatched))
        return "; ".join(f"{label} keys {keys[:limit]}" for label, keys in parts if keys)


def state_dict_fit(own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> LoadResult:
    """Compare ``given`` tensors with a model's ``own``: the one check used wherever weights are loaded."""
    mismatched = sorted(
        f"{k}: expected {tuple(own[k].shape)}, got {tuple(given[k].shape)}"
        for k in set(own) & set(given)
        if tuple(own[k].shape) != tuple(given[k].shape)
    )
    return LoadResult(sorted(set(own) - set(given)), sorted(set(given) - set(own)), mismatched)


def load_lora_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> LoadResult:
    """Load LoRA tensors into an injected model.

    ``strict=True`` raises ``KeyError`` naming every missing, unexpected or mis-shaped key and
    loads nothing; ``strict=False`` loads what fits and returns the lists.
    """
    own = get_lora_state_dict(model)
    if not own:
        raise ValueError("load_lora_state_dict: the model has no LoRA layers; call inject_lora first")
    fit = state_dict_fit(own, state_dict)
    missing, unexpected, mismatched = fit
    if strict and (missing or unexpected or mismatched):
        raise KeyError(f"load_lora_state_dict(strict=True): {fit.describe(limit=len(own) + len(state_dict))}")
    bad = {m.split(":")[0] for m in mismatched}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in set(own) & set(state_dict) - bad:
            params[key].copy_(state_dict[key])
    return LoadResult(missing, unexpected, mismatched)


def base_fingerprint(model: nn.Module, exclude_modules: Iterable[str] = ()) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of the frozen base tensors of ``model``.

    LoRA tensors and the modules in ``exclude_modules`` (trained heads saved with the adapter) are
    left out. Stored in adapter configs so an adapter is never applied to another base silently;
    the value is the same before and after injection, since base names do not change.
    """
    prefixes = tuple(f"{m}." for m in exclude_modules)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if _is_lora_name(name) or name.startswith(prefixes):
            continue
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    modules_to_save: Iterable[str] = (),
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` in PEFT's layout.

    Keys are ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``; the JSON holds
    PEFT's LoRA fields plus a ``lora_sam3d`` section (our full config, the adapted module names
    and a fingerprint of the base weights). ``modules_to_save`` names extra trained modules (e.g.
    an unfrozen ``out_layer``) whose parameters are stored as ``base_model.model.<name>.<param>``.
    Both files are written atomically.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers")
    config: LoRAConfig = getattr(model, "_lora_config", None) or LoRAConfig()
    if callable(config.target_modules) or callable(config.exclude_modules):  # JSON holds names, not code
        config = replace(config, target_modules=_exact_names(layers), exclude_modules=None)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{_PEFT_PREFIX}{k.rsplit('.', 1)[0]}.{k.rsplit('.', 1)[1]}.weight": v.detach().contiguous()
        for k, v in get_lora_state_dict(model).items()
    }
    extra = list(modules_to_save)
    for name in extra:
        for pname, p in model.get_submodule(name).named_parameters():
            tensors[f"{_PEFT_PREFIX}{name}.{pname}"] = p.detach().contiguous()
    ranks = {n: layer.rank for n, layer in layers.items()}
    alphas = {n: layer.alpha for n, layer in layers.items()}
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": sorted(layers),
        "rank_pattern": {n: r for n, r in ranks.items() if r != config.rank},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != config.alpha},
        "modules_to_save": extra or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "lora_sam3d": {
            "config": config.to_dict(),
            "layers": {
                n: {"rank": layer.rank, "alpha": layer.alpha, "slices": layer.enabled_slices}
                for n, layer in layers.items()
            },
            "base_fingerprint": base_fingerprint(model, extra),
        },
    }
    atomic_write(out / ADAPTER_WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(out / ADAPTER_CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(peft_config, indent=2)))
    return out


def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter folder we wrote; errors name the file."""
    if Path(directory).is_file():
        raise ValueError(
            f"{directory} is a file, but an adapter is a folder holding {ADAPTER_CONFIG_NAME} and "
            f"{ADAPTER_WEIGHTS_NAME} (a Lightning checkpoint goes to --ckpt_path, whole decoder weights "
            "to model.base.checkpoint)"
        )
    cfg_path = Path(directory) / ADAPTER_CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{cfg_path} does not exist (an adapter folder holds {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME})"
        )
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path} is not valid JSON: {err}") from err
    if not isinstance(meta.get("lora_sam3d"), dict) or "config" not in meta["lora_sam3d"]:
        raise ValueError(f"{cfg_path} has no 'lora_sam3d' section; not an adapter written by lora_sam3d")
    return meta


def load_adapter(model: nn.Module, directory: str | os.PathLike[str], check_base: bool = True) -> list[str]:
    """Inject LoRA as described by ``adapter_config.json`` (unless already injected) and load weights.

    Raises with the file name when a file is missing or unreadable, when the base model's
    fingerprint differs from the one the adapter was trained on (``check_base=False`` skips that),
    or when keys or shapes do not match. Returns the names of the adapted modules.
    """
    src = Path(directory)
    weights_path = src / ADAPTER_WEIGHTS_NAME
    meta = read_adapter_config(src)
    if not weights_path.is_file():
        raise FileNotFoundError(f"load_adapter: {weights_path} does not exist")
    ours = meta["lora_sam3d"]
    config = LoRAConfig.from_dict(ours["config"])
    if check_base and ours.get("base_fingerprint"):
        found = base_fingerprint(model, meta.get("modules_to_save") or ())
        if found != ours["base_fingerprint"]:
            raise ValueError(
                f"load_adapter: {src} was trained on another base model (fingerprint "
                f"{ours['base_fingerprint'][:12]}..., this model {found[:12]}...); pass check_base=False to force"
            )
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"load_adapter: cannot read {weights_path}: {err}") from err
    if not has_lora(model):
        names = sorted(ours.get("layers", {}))
        inject_lora(model, replace(config, target_modules=_exact_names(names), exclude_modules=None))
        model._lora_config = config  # type: ignore[assignment]
    lora_sd, extra = {}, {}
    for key, value in tensors.items():
        bare = key.removeprefix(_PEFT_PREFIX)
        if bare.endswith((".lora_A.weight", ".lora_B.weight")):
            lora_sd[bare.removesuffix(".weight")] = value
        else:
            extra[bare] = value
    try:
        load_lora_state_dict(model, lora_sd, strict=True)
    except KeyError as err:
        raise KeyError(f"load_adapter: {weights_path} does not fit this model: {err.args[0]}") from None
    if extra:
        params = dict(model.named_parameters())
        fit = state_dict_fit({k: params[k] for k in extra if k in params}, extra)
        if fit.unexpected or fit.mismatched:
            raise KeyError(
                f"load_adapter: {weights_path} does not fit this model's extra modules: {fit.describe()}"
            )
        with torch.no_grad():
            for key, value in extra.items():
                params[key].copy_(value)
    return sorted(lora_layers(model))
