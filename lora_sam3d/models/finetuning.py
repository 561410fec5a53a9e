"""What trains in the two-stage model, and with which adapters: the fine-tuning rules, as plain PyTorch.

`set_trainable` injects LoRA once (both stages, or the decoder alone with stage 1 trained fully) and
freezes the base; `FinetuneConfig` (``model.finetune``) says what trains, `adopt_adapter` takes an
adapter folder's own LoRA configs. `lora_sam3d.training.module.LoRAMeshDecoderModule` calls these from Lightning's hooks; a
notebook or another trainer can call them the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from lora_sam3d.lora import LoRAConfig, freeze_base_params, has_lora, state_dict_fit
from lora_sam3d.models.adapters.files import read_adapter_settings
from lora_sam3d.models.reconstructor import STRUCTURE_LORA_TARGETS, Reconstructor

__all__ = [
    "Finetune",
    "FinetuneConfig",
    "adopt_adapter",
    "check_stage_one_adaptable",
    "output_layer_blocks_lora",
    "set_trainable",
]

Finetune = Literal["lora", "full"]
FINETUNE_MODES: tuple[str, ...] = ("lora", "full")


def structure_lora_default() -> LoRAConfig:
    """Stage 1's adapters by default: r=2, alpha=4 on every convolution (`STRUCTURE_LORA_TARGETS`)."""
    return LoRAConfig(2, 4.0, target_modules=STRUCTURE_LORA_TARGETS)


@dataclass(frozen=True)
class FinetuneConfig:
    """What trains, and with which adapters (``model.finetune``).

    Args:
        mode: ``lora`` (base frozen, adapters trained) or ``full`` (every weight of both stages).
        structure_mode: with ``mode: lora``, stage 1 trains by ``lora`` (its convolutions) or ``full``.
        lora: the decoder's adapters (and the conditioning layers'; default r=4, alpha=8 on
            ``to_qkv`` and ``to_out``).
        structure_lora: stage 1's adapters, used with ``structure_mode: lora``.
        unfreeze: decoder module names trained as well in ``lora`` mode (e.g. ``["out_layer"]``).
        seed: the LoRA A matrices are drawn from this seed, whatever ran before.
        adapter: an adapter folder to start from (e.g. for ``predict`` without a checkpoint); its own
            LoRA settings replace ``lora``, ``structure_lora`` and ``unfreeze`` (`adopt_adapter`).
        adapters: one adapter per structure on one base, outside ``fit``: class name (or a shell
            pattern such as ``heart_*``) -> adapter folder (`lora_sam3d.models.adapters.bank`).
    """

    mode: Finetune = "lora"
    structure_mode: Finetune = "lora"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    structure_lora: LoRAConfig = field(default_factory=structure_lora_default)
    unfreeze: list[str] = field(default_factory=list)
    seed: int = 0
    adapter: str | None = None
    adapters: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.adapter and self.adapters:
            raise ValueError(
                "give model.finetune.adapter (one adapter) or model.finetune.adapters (one per structure), not both"
            )
        for name in ("mode", "structure_mode"):
            if getattr(self, name) not in FINETUNE_MODES:
                raise ValueError(
                    f"model.finetune.{name} must be one of {list(FINETUNE_MODES)}, got {getattr(self, name)!r}"
                )
        for name, default in (("lora", LoRAConfig), ("structure_lora", structure_lora_default)):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, default())
            elif isinstance(value, Mapping):
                object.__setattr__(self, name, LoRAConfig.from_dict(dict(value)))
        object.__setattr__(self, "unfreeze", list(self.unfreeze or []))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def adopt_adapter(finetune: FinetuneConfig) -> FinetuneConfig:
    """The fine-tuning an adapter folder fixes: with ``adapter`` (or the first of ``adapters``), its
    own LoRA configs, ``unfreeze`` and stage 1's mode replace the configured ones."""
    adapter = finetune.adapter or next(iter((finetune.adapters or {}).values()), None)
    if not adapter:
        return finetune
    stored = read_adapter_settings(adapter)
    changes: dict[str, Any] = {"lora": LoRAConfig.from_dict(stored.lora or {}), "unfreeze": stored.unfreeze}
    if stored.structure_lora is not None:
        changes["structure_lora"] = LoRAConfig.from_dict(stored.structure_lora)
    elif stored.structure_full:
        changes["structure_mode"] = "full"
    return replace(finetune, **changes)


def check_stage_one_adaptable(model: Reconstructor, finetune: FinetuneConfig) -> None:
    """LoRA on stage 1 needs stage-1 weights in the base (Meta's decoder file has none)."""
    lora = finetune.structure_mode == finetune.mode == "lora"
    if lora and model.uses_structure and not model.structure_in_base:
        raise ValueError(
            f"model.base.checkpoint {model.config.base.checkpoint} has no stage-1 (sparse structure) weights, so LoRA has "
            "nothing to adapt there: set model.finetune.structure_mode: full to train stage 1 from scratch"
        )


def output_layer_blocks_lora(model: Reconstructor, unfreeze: list[str]) -> bool:
    """The decoder's ``out_layer`` is all zeros (freshly initialised, as Meta's) and stays frozen, so
    every decoder LoRA gradient is zero."""
    return not model.decoder.out_layer.weight.any() and not any(n.startswith("out_layer") for n in unfreeze)


def set_trainable(model: Reconstructor, finetune: FinetuneConfig) -> bool:
    """Set what trains; idempotent. ``full``: every weight of both stages. ``lora``: LoRA injected
    (once; A drawn from ``seed``) into the decoder and, with ``structure_mode: lora``, stage 1,
    the base frozen, stage 1 trained fully with ``structure_mode: full``, plus the decoder
    modules in ``unfreeze``. Returns whether LoRA was injected by this call."""
    if finetune.mode == "full":
        model.requires_grad_(True)
        return False
    injected = not has_lora(model.decoder)
    if injected:
        stage1 = finetune.structure_lora if finetune.structure_mode == "lora" else None
        model.add_lora(finetune.lora, stage1, finetune.seed)
    freeze_base_params(model.decoder)
    freeze_base_params(model.structure)
    if model.conditioning is not None:
        freeze_base_params(model.conditioning)
    if model.uses_structure and finetune.structure_mode == "full":
        model.structure.requires_grad_(True)
    for name in finetune.unfreeze:
        try:
            model.decoder.get_submodule(name).requires_grad_(True)
        except AttributeError as err:
            raise ValueError(f"model.finetune.unfreeze: the decoder has no module {name!r}") from err
    return injected


def check_trainable_state(model: Reconstructor, state: Mapping[str, Any], prefix: str = "") -> None:
    """``state`` (keys under ``prefix``) must hold exactly the model's trainable tensors, with their
    shapes: what a checkpoint of this fine-tuning stores. The error names the difference."""
    trainable = {f"{prefix}{n}": p for n, p in model.named_parameters() if p.requires_grad}
    fit = state_dict_fit(trainable, state)
    if fit.missing or fit.unexpected or fit.mismatched:
        raise ValueError(
            f"checkpoint does not fit this model: {fit.describe()} "
            "(check model.finetune.lora / model.finetune.unfreeze / model.structure against the checkpoint's)"
        )
