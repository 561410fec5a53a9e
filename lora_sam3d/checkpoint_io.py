"""Lightning checkpoint files: written atomically, and recognised as this model's design on load.

`AtomicCheckpointIO` writes Lightning checkpoints beside their final name, syncs, then renames.
Lightning's own `TorchCheckpointIO` writes through an fsspec transaction whose temporary file lives
in the system temp folder; when that folder is on another filesystem than the checkpoints (a
node's local /tmp vs a shared volume, the usual case on clusters) the final step is a copy into
the final name, so a run killed during that copy leaves a truncated ``last.ckpt`` that
``--ckpt_path last`` then picks up. Writing the temporary file in the checkpoint folder and
renaming it there is atomic on every POSIX filesystem. The temporary name starts with a dot, so
Lightning's search for ``last*.ckpt`` never takes it for a checkpoint. The `lora-sam3d` command
installs it by default (``trainer.plugins``); Python users pass
``Trainer(plugins=[AtomicCheckpointIO()])``. Reading weight files lives in `lora_sam3d.weights`,
adapter folders in `lora_sam3d.models.adapter_files`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lora_sam3d.atomic import atomic_write
from lora_sam3d.weights import require_file, unreadable

__all__ = [
    "DESIGN",
    "OLD_PREFIXES",
    "AtomicCheckpointIO",
    "check_checkpoint",
    "check_design",
    "upgrade_state_dict",
]


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` for local paths whose saves are all-or-nothing (see the module docstring)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        if "://" in str(path):  # remote storage: leave it to fsspec's own transaction
            super().save_checkpoint(checkpoint, path)
            return
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if "://" not in str(path):
            require_file(path)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as err:
            raise unreadable(path, err) from err


DESIGN = "coarse-to-fine-1"
"""Checkpoints carry this; those of the one-stage design (none) are refused with a clear error."""


def check_design(meta: dict[str, Any]) -> None:
    """Refuse a checkpoint's ``lora_sam3d`` section written by another model design, saying so."""
    if meta.get("design") != DESIGN:
        raise ValueError(
            "this checkpoint is from the earlier one-stage design (the decoder read a dense slice "
            "unprojection); the coarse-to-fine model (stage 1 + decoder on the active band) cannot "
            "use it: train again with this version"
        )


def check_checkpoint(checkpoint: dict[str, Any], finetune: Any, base_fingerprint: str) -> dict[str, Any]:
    """A checkpoint's ``lora_sam3d`` section, checked against the model about to load it: written by
    this design, in the same fine-tuning modes (``finetune``, a `FinetuneConfig`), on the same base weights."""
    meta = checkpoint.get("lora_sam3d")
    if not isinstance(meta, dict):
        raise ValueError("this checkpoint was not written by lora-sam3d (no 'lora_sam3d' section)")
    check_design(meta)
    for key, field in (("finetune", "mode"), ("structure_finetune", "structure_mode")):
        if meta[key] != getattr(finetune, field):
            raise ValueError(
                f"checkpoint has finetune.{field} '{meta[key]}' but the model is configured for "
                f"'{getattr(finetune, field)}'; set model.finetune.{field}: {meta[key]}"
            )
    if meta["base_fingerprint"] != base_fingerprint:
        raise ValueError(
            f"checkpoint was trained on another base (fingerprint {meta['base_fingerprint'][:12]}..., "
            f"this model {base_fingerprint[:12]}...; the base path stored in the checkpoint is "
            f"{meta.get('base_checkpoint')!r}: point model.base.checkpoint to that base)"
        )
    return meta


OLD_PREFIXES = ("decoder.", "structure.")
"""State-dict prefixes of checkpoints written before the model moved under ``model.``."""


def upgrade_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Rename a checkpoint's ``decoder.*``/``structure.*`` keys (the module held both stages itself)
    to ``model.decoder.*``/``model.structure.*`` (the module holds the `Reconstructor`), in place."""
    for key in [k for k in state if k.startswith(OLD_PREFIXES)]:
        state[f"model.{key}"] = state.pop(key)
    return state
