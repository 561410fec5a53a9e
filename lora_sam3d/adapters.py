"""Adapter folders of the two-stage model, and the bank that routes one adapter per structure.

An adapter folder holds the decoder's adapter in PEFT's layout (``adapter_model.safetensors`` +
``adapter_config.json``, see `lora_sam3d.lora.save_adapter`), stage 1's beside it (its LoRA adapter
in ``structure/``, or its full weights in ``structure.safetensors`` when it trained fully) and
``model.json``: the model it was trained with and its data settings, so the folder alone can
predict. `AdapterBank` keeps several such folders trained on one base in memory and swaps their
tensors in per class. Plain PyTorch and safetensors: no Lightning.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lora_sam3d.atomic import atomic_write
from lora_sam3d.lora import has_lora, load_adapter, save_adapter

if TYPE_CHECKING:
    from lora_sam3d.models.reconstructor import Reconstruction, Reconstructor

STRUCTURE_ADAPTER = "structure"
"""Sub-folder of an adapter folder holding stage 1's adapter (or ``structure.safetensors``, full weights)."""

MODEL_SETTINGS = ("decoder", "structure", "base_checkpoint", "latent_encoder", "active_margin")
"""The model arguments an adapter folder's `MODEL_FILE` stores: the model it was trained with."""

MODEL_FILE = "model.json"
"""In an adapter folder: the model it was trained with (classes, decoder and stage-1 sizes, base) and
its data settings, so the folder alone can predict."""

SHARED_DATA_SETTINGS = ("spacing", "modality", "ct_window_hu", "slice_size", "frame_scale")
"""Data settings every adapter of one routed run must share: one run reads each scan one way."""


def read_model_file(directory: str | Path) -> dict[str, Any]:
    """An adapter folder's `MODEL_FILE` ({} for folders written before it existed)."""
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        return {}
    try:
        stored = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(stored, dict):
        raise ValueError(
            f"{path} must hold a JSON object (the model's settings), got {type(stored).__name__}"
        )
    return stored


def model_settings(model: Reconstructor) -> dict[str, Any]:
    """The `MODEL_SETTINGS` of a model, as `MODEL_FILE` and checkpoints store them."""
    return {
        "decoder": model.decoder_config,
        "structure": model.structure_config,
        "base_checkpoint": model.base,
        "latent_encoder": model.latent_encoder,
        "active_margin": model.active_margin,
    }


def save_model_adapter(
    model: Reconstructor,
    directory: str | Path,
    classes: list[str],
    unfreeze: list[str] | None = None,
    data: dict[str, Any] | None = None,
) -> Path:
    """Write both stages' adapters of ``model`` and its `MODEL_FILE` to ``directory`` (see the module
    docstring). Stage 1 without LoRA but trainable is written as full weights."""
    from safetensors.torch import save_file

    out = Path(directory)
    save_adapter(model.decoder, out, modules_to_save=unfreeze or [], base_model_name_or_path=model.base)
    text = json.dumps({"classes": list(classes), **model_settings(model), "data": data}, indent=2)
    atomic_write(out / MODEL_FILE, lambda tmp: tmp.write_text(text))
    if has_lora(model.structure):
        save_adapter(model.structure, out / STRUCTURE_ADAPTER)
    elif model.uses_structure and any(p.requires_grad for p in model.structure.parameters()):
        tensors = {k: v.detach().contiguous() for k, v in model.structure.state_dict().items()}
        atomic_write(out / f"{STRUCTURE_ADAPTER}.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    return out


def load_model_adapter(model: Reconstructor, directory: str | Path) -> dict[str, Any]:
    """Load what `save_model_adapter` wrote into both stages (LoRA injected where it is not yet);
    returns the folder's `MODEL_FILE` contents ({} when it has none)."""
    from safetensors.torch import load_file

    src = Path(directory)
    load_adapter(model.decoder, src)
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


class AdapterBank:
    """One adapter per structure on one base: each folder read once, its tensors swapped in per class.

    Args:
        model: the base with LoRA injected (the adapters' layout).
        adapters: class name or shell pattern (``heart_*``) -> adapter folder. A class runs with the
            adapter of its exact name; else with the one pattern that matches it (two matching
            patterns are an error naming both).
        names: the parameters an adapter sets (the model's trainable ones).
    """

    def __init__(self, model: Reconstructor, adapters: Mapping[str, str | Path], names: list[str]) -> None:
        self.model, self.folders = model, {k: str(v) for k, v in adapters.items()}
        params = dict(model.named_parameters())
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self.stored: dict[str, dict[str, Any]] = {}
        for key, folder in self.folders.items():
            self.stored[key] = load_model_adapter(model, folder)  # checks the base and the LoRA shapes
            self.tensors[key] = {n: params[n].detach().clone() for n in names}
        self.active: str | None = None
        self._check_shared_settings()

    def _check_shared_settings(self) -> None:
        known = {k: s["data"] for k, s in self.stored.items() if s.get("data")}
        if not known:
            return
        (first, base), *others = known.items()
        for key, data in others:
            for name in SHARED_DATA_SETTINGS:
                if data[name] != base[name]:
                    raise ValueError(
                        f"model.adapters: {self.folders[first]} and {self.folders[key]} were trained with "
                        f"different data.{name} ({base[name]} vs {data[name]}); one run predicts with one "
                        "preprocessing"
                    )

    def key_for(self, class_name: str) -> str:
        """The key of ``model.adapters`` that covers a class (see the class docstring)."""
        if class_name in self.tensors:
            return class_name
        matches = [k for k in self.tensors if fnmatch.fnmatchcase(class_name, k)]
        if len(matches) > 1:
            raise ValueError(
                f"class {class_name!r} matches {len(matches)} patterns of model.adapters ({matches}): "
                "give the class its own entry, or make the patterns exclusive"
            )
        if not matches:
            raise ValueError(
                f"class {class_name!r} is covered by no adapter of model.adapters (keys {list(self.tensors)})"
            )
        return matches[0]

    def data_settings(self, class_name: str) -> dict[str, Any] | None:
        """The stored data settings (``model.json``'s ``data``) of the adapter that covers a class."""
        return self.stored[self.key_for(class_name)].get("data")

    def data_contract(self) -> dict[str, Any] | None:
        """The shared data settings, with every adapter's classes and each class's extent from the
        adapter that predicts it."""
        known = {k: s["data"] for k, s in self.stored.items() if s.get("data")}
        if not known:
            return None
        classes = list(dict.fromkeys(c for data in known.values() for c in data["classes"]))
        extents = {}
        for c in classes:
            try:
                data = self.data_settings(c)
            except ValueError:  # a class no adapter of this run covers
                continue
            if data and c in data["extent_mm"]:
                extents[c] = data["extent_mm"][c]
        return {**next(iter(known.values())), "classes": classes, "extent_mm": extents}

    def use(self, key: str) -> None:
        """Copy adapter ``key``'s tensors into the model (no-op when it is already in)."""
        if self.active != key:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, tensor in self.tensors[key].items():
                    params[name].copy_(tensor)
            self.active = key

    def __call__(self, batch: dict[str, Any]) -> Reconstruction:
        """The model on ``batch``, each sample with its class's adapter, in the batch's order."""
        from lora_sam3d.models.reconstructor import Reconstruction

        keys = [self.key_for(c) for c in batch["class_name"]]
        parts, order = [], []
        for key in dict.fromkeys(keys):
            idx = [i for i, k in enumerate(keys) if k == key]
            self.use(key)
            parts.append(self.model(select(batch, idx)))
            order += idx
        back = torch.as_tensor(np.argsort(order), device=parts[0].sdf.device)
        return Reconstruction.cat(parts).select(back)


def select(batch: dict[str, Any], idx: list[int]) -> dict[str, Any]:
    """The samples ``idx`` of a collated batch (tensors indexed, lists picked)."""
    return {k: v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in idx] for k, v in batch.items()}
