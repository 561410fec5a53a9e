"""LoRA state dicts and adapter folders in PEFT's layout (``adapter_model.safetensors`` +
``adapter_config.json``), with a fingerprint of the base they were trained on."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_sam3d.io.atomic import atomic_write
from lora_sam3d.lora.config import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, LoRAConfig
from lora_sam3d.lora.inject import exact_names, has_lora, inject_lora, is_lora_name, lora_layers

__all__ = [
    "LoadResult",
    "base_fingerprint",
    "get_lora_state_dict",
    "load_adapter",
    "load_lora_state_dict",
    "read_adapter_config",
    "save_adapter",
    "state_dict_fit",
]

_PEFT_PREFIX = "base_model.model."
"""The prefix PEFT gives the wrapped model's names in its files."""


def get_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, keyed ``<module>.lora_A`` (r, in) / ``<module>.lora_B`` (out, r)."""
    return {k: v for k, v in model.state_dict().items() if is_lora_name(k)}


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
        if is_lora_name(name) or name.startswith(prefixes):
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
        config = replace(config, target_modules=exact_names(layers), exclude_modules=None)
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
        inject_lora(model, replace(config, target_modules=exact_names(names), exclude_modules=None))
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
