"""What trains in the two-stage model, and with which adapters: the fine-tuning rules, as plain PyTorch.

`set_trainable` injects LoRA once (both stages, or the decoder alone with stage 1 trained fully) and
freezes the base; `lora_configs` gives both stages' `LoRAConfig`, an adapter folder's own when one
is given. `lora_sam3d.module.LoRAMeshDecoderModule` calls these from Lightning's hooks; a
notebook or another trainer can call them the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from lora_sam3d.lora import LoRAConfig, freeze_base_params, has_lora, state_dict_fit
from lora_sam3d.models.adapter_files import read_adapter_settings
from lora_sam3d.models.reconstructor import STRUCTURE_LORA_TARGETS, Reconstructor

__all__ = [
    "Finetune",
    "check_stage_one_adaptable",
    "lora_configs",
    "output_layer_blocks_lora",
    "set_trainable",
]

Finetune = Literal["lora", "full"]


def lora_configs(
    lora: LoRAConfig | dict | None, structure_lora: LoRAConfig | dict | None, adapter: str | None
) -> tuple[LoRAConfig, LoRAConfig, dict[str, Any]]:
    """Both stages' LoRA configs (dicts come from a checkpoint's hyper-parameters) and the settings
    an adapter folder fixes: with ``adapter``, its own configs, ``unfreeze`` and stage 1's
    fine-tuning mode replace the configured ones."""
    decoder = LoRAConfig.from_dict(lora) if isinstance(lora, dict) else lora or LoRAConfig()
    stage1 = (
        LoRAConfig.from_dict(structure_lora)
        if isinstance(structure_lora, dict)
        else structure_lora or LoRAConfig(2, 4.0, target_modules=STRUCTURE_LORA_TARGETS)
    )
    if not adapter:
        return decoder, stage1, {}
    stored = read_adapter_settings(adapter)
    decoder = LoRAConfig.from_dict(stored.lora or {})
    adopted: dict[str, Any] = {"unfreeze": stored.unfreeze}
    if stored.structure_lora is not None:
        stage1 = LoRAConfig.from_dict(stored.structure_lora)
    elif stored.structure_full:
        adopted["structure_finetune"] = "full"
    return decoder, stage1, adopted


def check_stage_one_adaptable(model: Reconstructor, finetune: Finetune, structure_finetune: Finetune) -> None:
    """LoRA on stage 1 needs stage-1 weights in the base (Meta's decoder file has none)."""
    if structure_finetune == finetune == "lora" and model.uses_structure and not model.structure_in_base:
        raise ValueError(
            f"base_checkpoint {model.base} has no stage-1 (sparse structure) weights, so LoRA has "
            "nothing to adapt there: set model.structure_finetune: full to train stage 1 from scratch"
        )


def output_layer_blocks_lora(model: Reconstructor, unfreeze: list[str]) -> bool:
    """The decoder's ``out_layer`` is all zeros (freshly initialised, as Meta's) and stays frozen, so
    every decoder LoRA gradient is zero."""
    return not model.decoder.out_layer.weight.any() and not any(n.startswith("out_layer") for n in unfreeze)


def set_trainable(
    model: Reconstructor,
    finetune: Finetune,
    structure_finetune: Finetune,
    lora: LoRAConfig,
    structure_lora: LoRAConfig,
    unfreeze: list[str],
    seed: int = 0,
) -> bool:
    """Set what trains; idempotent. ``full``: every weight of both stages. ``lora``: LoRA injected
    (once; A drawn from ``seed``) into the decoder and, with ``structure_finetune: lora``, stage 1,
    the base frozen, stage 1 trained fully with ``structure_finetune: full``, plus the decoder
    modules in ``unfreeze``. Returns whether LoRA was injected by this call."""
    if finetune == "full":
        model.requires_grad_(True)
        return False
    injected = not has_lora(model.decoder)
    if injected:
        model.add_lora(lora, structure_lora if structure_finetune == "lora" else None, seed)
    freeze_base_params(model.decoder)
    freeze_base_params(model.structure)
    if model.conditioning is not None:
        freeze_base_params(model.conditioning)
    if model.uses_structure and structure_finetune == "full":
        model.structure.requires_grad_(True)
    for name in unfreeze:
        try:
            model.decoder.get_submodule(name).requires_grad_(True)
        except AttributeError as err:
            raise ValueError(f"unfreeze: the decoder has no module {name!r}") from err
    return injected


def check_trainable_state(model: Reconstructor, state: Mapping[str, Any], prefix: str = "") -> None:
    """``state`` (keys under ``prefix``) must hold exactly the model's trainable tensors, with their
    shapes: what a checkpoint of this fine-tuning stores. The error names the difference."""
    trainable = {f"{prefix}{n}": p for n, p in model.named_parameters() if p.requires_grad}
    fit = state_dict_fit(trainable, state)
    if fit.missing or fit.unexpected or fit.mismatched:
        raise ValueError(
            f"checkpoint does not fit this model: {fit.describe()} "
            "(check model.lora / model.unfreeze / model.structure against the checkpoint's)"
        )
