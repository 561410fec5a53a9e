"""What a trained model says of itself: one record, the same in checkpoints and adapter folders.

A `Manifest` is the model's settings (the `MODEL_SETTINGS` groups of `ModelConfig`), its classes,
how it was fine-tuned, its data contract (how it reads scans: a plain dict, see
`lora_sam3d.data.settings.DataContract`), the base weights' fingerprint and the tensors it trained.
A checkpoint holds it as its `SECTION` and an adapter folder as `MODEL_FILE`: `Manifest.to_dict`
is the one layout both are written in, `Manifest.from_dict` the one reader. The reader also takes
the unversioned layouts earlier versions wrote (a checkpoint section with the fine-tuning mode as a
string, a ``model.json`` with the groups at its top, flat keys included) and refuses, in one line,
a manifest that is missing or from a newer version.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lora_sam3d.io.atomic import atomic_write
from lora_sam3d.settings.old_keys import first_layout

__all__ = ["DESIGN", "MODEL_FILE", "MODEL_SETTINGS", "SECTION", "VERSION", "Manifest", "check_design"]

VERSION = 2
"""The manifest layout this version writes; manifests without a ``version`` are the earlier layout (1)."""

SECTION = "lora_sam3d"
"""The key of a checkpoint that holds its manifest."""

MODEL_FILE = "model.json"
"""The file of an adapter folder that holds its manifest, so the folder alone can predict."""

DESIGN = "coarse-to-fine-1"
"""Manifests carry this; those of the one-stage design (none) are refused with a clear error."""

MODEL_SETTINGS = ("decoder", "structure", "base", "latents", "band", "context")
"""The groups of `lora_sam3d.models.config.ModelConfig` a manifest stores (each with the keys that
change what the model predicts)."""


def check_design(design: str | None) -> None:
    """Refuse a manifest written by another model design, saying so."""
    if design != DESIGN:
        raise ValueError(
            "this checkpoint is from the earlier one-stage design (the decoder read a dense slice "
            "unprojection); the coarse-to-fine model (stage 1 + decoder on the active band) cannot "
            "use it: train again with this version"
        )


@dataclass(frozen=True)
class Manifest:
    """A trained model's description (see the module docstring).

    Attributes:
        classes: the structures it predicts, in its class order.
        model: the `MODEL_SETTINGS` groups as plain dicts ({} when unknown: a checkpoint of the
            earlier layout stores only the decoder, stage 1 and the base).
        finetune: `FinetuneConfig.to_dict` (``mode``, ``structure_mode``, both stages' LoRA, ``unfreeze``);
            {} for an adapter folder of the earlier layout (its ``adapter_config.json`` says it).
        data: the data contract, or None for a model that never saw a data module.
        base_fingerprint: SHA-256 of the base weights it was trained on (None where not stored).
        trainable: the state-dict names of the tensors it trained.
    """

    classes: list[str]
    model: dict[str, Any]
    finetune: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] | None = None
    base_fingerprint: str | None = None
    trainable: list[str] = field(default_factory=list)
    design: str | None = DESIGN
    version: int = VERSION

    @classmethod
    def describe(
        cls,
        model: Any,
        classes: list[str],
        data: dict[str, Any] | None = None,
        finetune: dict[str, Any] | None = None,
        trainable: list[str] | None = None,
    ) -> Manifest:
        """The manifest of ``model`` (a `lora_sam3d.models.Reconstructor`: its settings and base)."""
        return cls(
            classes=list(classes),
            model=model.settings(),
            finetune=dict(finetune or {}),
            data=data,
            base_fingerprint=model.base_fingerprint,
            trainable=list(trainable or []),
        )

    @property
    def base_path(self) -> str | None:
        return (self.model.get("base") or {}).get("checkpoint")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, stored: Any, source: str) -> Manifest:
        """Read a manifest of any layout this version knows; ``source`` names the file in errors."""
        if not isinstance(stored, dict):
            raise ValueError(f"{source} has no lora-sam3d manifest: not written by lora-sam3d")
        version = stored.get("version", 1)
        if not isinstance(version, int) or version > VERSION:
            raise ValueError(
                f"{source} was written by a newer lora-sam3d (manifest version {version!r}; this one "
                f"reads versions 1 to {VERSION}): upgrade lora-sam3d to use it"
            )
        if version == 1:
            return _from_first_layout(stored)
        known = {k: stored[k] for k in cls.__dataclass_fields__ if k in stored}
        return cls(**{"classes": [], "model": {}, "design": None, **known})

    # -- checkpoints --------------------------------------------------------------------------------
    def write_to(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[SECTION] = self.to_dict()

    @classmethod
    def of_checkpoint(cls, checkpoint: dict[str, Any], source: str = "this checkpoint") -> Manifest:
        """A checkpoint's manifest, checked to be of this design."""
        manifest = cls.from_dict(checkpoint.get(SECTION), source)
        check_design(manifest.design)
        if not manifest.classes:  # the earlier layout kept the classes in the hyper-parameters only
            classes = (checkpoint.get("hyper_parameters") or {}).get("classes") or []
            manifest = replace(manifest, classes=list(classes))
        return manifest

    # -- adapter folders ----------------------------------------------------------------------------
    def write_folder(self, folder: Path) -> None:
        text = json.dumps(self.to_dict(), indent=2)
        atomic_write(folder / MODEL_FILE, lambda tmp: tmp.write_text(text))

    @classmethod
    def of_folder(cls, folder: str | Path) -> Manifest | None:
        """An adapter folder's ``model.json`` (None for folders written before it existed)."""
        path = Path(folder) / MODEL_FILE
        if not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(stored, dict):
            raise ValueError(
                f"{path} must hold a JSON object (the model's settings), got {type(stored).__name__}"
            )
        return cls.from_dict(stored, str(path))


def _from_first_layout(stored: dict[str, Any]) -> Manifest:
    """The unversioned layouts (a checkpoint section or a ``model.json``), read by the one module
    that knows the earlier names (`lora_sam3d.settings.old_keys.first_layout`)."""
    fields = first_layout(stored)
    fields["model"] = {k: v for k, v in fields["model"].items() if k in MODEL_SETTINGS}
    return Manifest(**fields, version=1)
