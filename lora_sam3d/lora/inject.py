"""Finding the modules to adapt, wrapping them, merging the adapters back, freezing the base and
counting parameters."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from torch import nn

from lora_sam3d.lora.config import LoRAConfig, Selector
from lora_sam3d.lora.layers import LoRAConv3d, LoRALayer, LoRALinear

__all__ = [
    "ADAPTABLE_TYPES",
    "count_parameters",
    "exact_names",
    "freeze_base_params",
    "get_lora_params",
    "has_lora",
    "inject_lora",
    "is_lora_name",
    "lora_layers",
    "merge_lora_weights",
    "setup_lora_for_medical_finetuning",
    "unload_lora",
]

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


def exact_names(names: Iterable[str]) -> str:
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


def is_lora_name(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("lora_A", "lora_B")


def freeze_base_params(model: nn.Module) -> None:
    """Only LoRA parameters stay trainable."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_name(name))


def get_lora_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if is_lora_name(n)]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{'total', 'trainable', 'lora'}`` parameter counts (shared tensors counted once)."""
    total = trainable = lora = 0
    for name, param in model.named_parameters():
        n = param.numel()
        total += n
        trainable += n if param.requires_grad else 0
        lora += n if is_lora_name(name) else 0
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
