"""Adapter folders of the two-stage model: writing them, reading them back, and what they say of the model.

A folder holds the decoder's adapter in PEFT's layout (``adapter_model.safetensors`` +
``adapter_config.json``, see `lora_sam3d.lora.save_adapter`), stage 1's beside it (its LoRA adapter
in ``structure/``, or its full weights in ``structure.safetensors`` when it trained fully) and
``model.json``: its `lora_sam3d.models.adapters.manifest.Manifest` (the model it was trained with, its
classes and data settings), so the folder alone can predict. `read_adapter_settings` is the one reader of a folder's settings: the model
(`lora_sam3d.models.Reconstructor.from_adapter`), the LightningModule and the command all use it.
Plain PyTorch and safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from lora_sam3d.io.atomic import atomic_write
from lora_sam3d.lora import has_lora, load_adapter, read_adapter_config, save_adapter
from lora_sam3d.models.adapters.manifest import MODEL_FILE, MODEL_SETTINGS, Manifest

__all__ = [
    "CONDITIONING_ADAPTER",
    "MODEL_FILE",
    "MODEL_SETTINGS",
    "STRUCTURE_ADAPTER",
    "AdapterSettings",
    "load_model_adapter",
    "read_adapter_settings",
    "read_model_file",
    "save_model_adapter",
]

STRUCTURE_ADAPTER = "structure"
"""Sub-folder of an adapter folder holding stage 1's adapter (or ``structure.safetensors``, full weights)."""

CONDITIONING_ADAPTER = "conditioning"
"""Sub-folder of an adapter folder holding the conditioning layers' adapter (models that have them)."""


class TwoStageModel(Protocol):
    """What adapter folders read and write of a model (`lora_sam3d.models.Reconstructor`)."""

    decoder: nn.Module
    structure: nn.Module
    conditioning: nn.Module | None
    uses_structure: bool
    base: str | None

    def settings(self) -> dict[str, Any]: ...


def read_model_file(directory: str | Path) -> dict[str, Any]:
    """An adapter folder's `MODEL_FILE` as this version writes it ({} for folders without one)."""
    manifest = Manifest.of_folder(directory)
    return manifest.to_dict() if manifest is not None else {}


@dataclass
class AdapterSettings:
    """Everything an adapter folder says of the run that wrote it.

    Attributes:
        folder: the adapter folder.
        model: the `MODEL_SETTINGS` it was trained with ({} for a folder without `MODEL_FILE`).
        classes: the structures it predicts.
        data: its data contract (`lora_sam3d.data.settings.DataContract.to_dict`), or None.
        lora, structure_lora: both stages' `LoRAConfig` as dicts (``structure_lora`` None when stage 1
            trained fully or is absent).
        structure_full: stage 1's full weights are stored (``structure.safetensors``).
        unfreeze: decoder modules trained fully beside the adapter (PEFT's ``modules_to_save``).
    """

    folder: Path
    model: dict[str, Any]
    classes: list[str] = field(default_factory=list)
    data: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    structure_lora: dict[str, Any] | None = None
    structure_full: bool = False
    unfreeze: list[str] = field(default_factory=list)

    @property
    def model_file(self) -> Path:
        return self.folder / MODEL_FILE

    def require_model(self) -> AdapterSettings:
        """These settings, or an error when the folder has no `MODEL_FILE` to build a model from."""
        if not self.model:
            raise FileNotFoundError(
                f"{self.model_file} does not exist: not an adapter folder of this version "
                "(written by AdapterCheckpoint or export)"
            )
        return self


def read_adapter_settings(folder: str | Path) -> AdapterSettings:
    """What an adapter folder says of its model, classes, data and adapters (see `AdapterSettings`)."""
    src = Path(folder)
    manifest = Manifest.of_folder(src) or Manifest(classes=[], model={})
    meta = read_adapter_config(src)
    structure_lora = None
    if (src / STRUCTURE_ADAPTER).is_dir():
        structure_lora = read_adapter_config(src / STRUCTURE_ADAPTER)["lora_sam3d"]["config"]
    return AdapterSettings(
        folder=src,
        model=manifest.model,
        classes=list(manifest.classes),
        data=manifest.data,
        lora=meta["lora_sam3d"]["config"],
        structure_lora=structure_lora,
        structure_full=(src / f"{STRUCTURE_ADAPTER}.safetensors").is_file(),
        unfreeze=list(meta.get("modules_to_save") or []),
    )


def save_model_adapter(model: TwoStageModel, directory: str | Path, manifest: Manifest) -> Path:
    """Write both stages' adapters of ``model`` and its `Manifest` (`MODEL_FILE`) to ``directory``
    (see the module docstring). Stage 1 without LoRA but trainable is written as full weights."""
    from safetensors.torch import save_file

    out = Path(directory)
    unfreeze = list(manifest.finetune.get("unfreeze") or [])
    save_adapter(
        model.decoder, out, modules_to_save=unfreeze, base_model_name_or_path=model.config.base.checkpoint
    )
    manifest.write_folder(out)
    if model.conditioning is not None and has_lora(model.conditioning):
        save_adapter(model.conditioning, out / CONDITIONING_ADAPTER)
    if has_lora(model.structure):
        save_adapter(model.structure, out / STRUCTURE_ADAPTER)
    elif model.uses_structure and any(p.requires_grad for p in model.structure.parameters()):
        tensors = {k: v.detach().contiguous() for k, v in model.structure.state_dict().items()}
        atomic_write(out / f"{STRUCTURE_ADAPTER}.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    return out


def load_model_adapter(model: TwoStageModel, directory: str | Path) -> dict[str, Any]:
    """Load what `save_model_adapter` wrote into both stages (LoRA injected where it is not yet);
    returns the folder's `MODEL_FILE` contents ({} when it has none)."""
    from safetensors.torch import load_file

    src = Path(directory)
    load_adapter(model.decoder, src)
    if model.conditioning is not None and (src / CONDITIONING_ADAPTER).is_dir():
        load_adapter(model.conditioning, src / CONDITIONING_ADAPTER)
    if (src / STRUCTURE_ADAPTER).is_dir():
        load_adapter(model.structure, src / STRUCTURE_ADAPTER)
    elif (src / f"{STRUCTURE_ADAPTER}.safetensors").is_file():
        model.structure.load_state_dict(load_file(str(src / f"{STRUCTURE_ADAPTER}.safetensors")))
    elif model.uses_structure:
        raise FileNotFoundError(
            f"{src} holds no stage-1 adapter ({STRUCTURE_ADAPTER}/ or {STRUCTURE_ADAPTER}.safetensors): "
            "it was written by the one-stage design or for precomputed latents"
        )
    return read_model_file(src)
