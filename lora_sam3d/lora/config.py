"""What to adapt and how (`LoRAConfig`): plain data, so LightningCLI builds it from YAML and
adapter files store it as PEFT's ``adapter_config.json`` fields."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import nn

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "LoRAConfig",
    "Selector",
]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
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
