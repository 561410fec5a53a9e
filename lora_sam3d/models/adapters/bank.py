"""`AdapterBank`: one adapter per structure on one base, routed by class, above the model.

Several adapter folders (`lora_sam3d.models.adapters.files`) trained on one base are read once and
kept in memory; each batch runs its samples grouped by class, with that class's tensors swapped
into the model. Plain PyTorch: no Lightning.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_sam3d.inputs import Batch
from lora_sam3d.models.adapters.files import load_model_adapter
from lora_sam3d.models.reconstructor import Reconstruction, Reconstructor

__all__ = ["AdapterBank"]


class AdapterBank:
    """One adapter per structure on one base: each folder read once, its tensors swapped in per class.

    Args:
        model: the base with LoRA injected (the adapters' layout).
        adapters: class name or shell pattern (``heart_*``) -> adapter folder. A class runs with the
            adapter of its exact name; else with the one pattern that matches it (two matching
            patterns are an error naming both).
        names: the parameters an adapter sets (the model's trainable ones).
        agree_on: data settings every adapter that stores its data settings must share (the
            preprocessing: one run reads its scans one way); the caller names them, so the bank
            knows nothing of the data side.
    """

    def __init__(
        self,
        model: Reconstructor,
        adapters: Mapping[str, str | Path],
        names: list[str],
        agree_on: Sequence[str] = (),
    ) -> None:
        self.model, self.folders = model, {k: str(v) for k, v in adapters.items()}
        self.agree_on = tuple(agree_on)
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
            for name in self.agree_on:
                if data.get(name) != base.get(name):
                    raise ValueError(
                        f"model.finetune.adapters: {self.folders[first]} and {self.folders[key]} were trained with "
                        f"different data.{name} ({base[name]} vs {data[name]}); one run predicts with one "
                        "preprocessing"
                    )

    def key_for(self, class_name: str) -> str:
        """The key of ``model.finetune.adapters`` that covers a class (see the class docstring)."""
        if class_name in self.tensors:
            return class_name
        matches = [k for k in self.tensors if fnmatch.fnmatchcase(class_name, k)]
        if len(matches) > 1:
            raise ValueError(
                f"class {class_name!r} matches {len(matches)} patterns of model.finetune.adapters ({matches}): "
                "give the class its own entry, or make the patterns exclusive"
            )
        if not matches:
            raise ValueError(
                f"class {class_name!r} is covered by no adapter of model.finetune.adapters (keys {list(self.tensors)})"
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

    def __call__(self, batch: Batch) -> Reconstruction:
        """The model on ``batch``, each sample with its class's adapter, in the batch's order."""
        keys = [self.key_for(c) for c in batch.info.class_name]
        parts, order = [], []
        for key in dict.fromkeys(keys):
            idx = [i for i, k in enumerate(keys) if k == key]
            self.use(key)
            parts.append(self.model(batch.evidence.select(idx)))
            order += idx
        back = torch.as_tensor(np.argsort(order), device=parts[0].sdf.device)
        return Reconstruction.cat(parts).select(back)
