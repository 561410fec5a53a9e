"""Lightning checkpoint files: written atomically, and checked against the model on load.

`AtomicCheckpointIO` writes Lightning checkpoints beside their final name, syncs, then renames.
Lightning's own `TorchCheckpointIO` writes through an fsspec transaction whose temporary file lives
in the system temp folder; when that folder is on another filesystem than the checkpoints (a
node's local /tmp vs a shared volume, the usual case on clusters) the final step is a copy into
the final name, so a run killed during that copy leaves a truncated ``last.ckpt`` that
``--ckpt_path last`` then picks up. Writing the temporary file in the checkpoint folder and
renaming it there is atomic on every POSIX filesystem. The temporary name starts with a dot, so
Lightning's search for ``last*.ckpt`` never takes it for a checkpoint. The `lora-sam3d` command
installs it by default (``trainer.plugins``); Python users pass
``Trainer(plugins=[AtomicCheckpointIO()])``. Reading weight files lives in `lora_sam3d.io.weights`,
adapter folders in `lora_sam3d.models.adapters.files`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lora_sam3d.io.atomic import atomic_write
from lora_sam3d.io.weights import require_file, unreadable
from lora_sam3d.models.adapters.manifest import Manifest

__all__ = ["AtomicCheckpointIO", "check_checkpoint"]


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


def check_checkpoint(checkpoint: dict[str, Any], finetune: Any, base_fingerprint: str) -> Manifest:
    """A checkpoint's `Manifest`, checked against the model about to load it: written by this
    design, in the same fine-tuning modes (``finetune``, a `FinetuneConfig`), on the same base weights."""
    manifest = Manifest.of_checkpoint(checkpoint)
    for field in ("mode", "structure_mode"):
        if manifest.finetune.get(field) != getattr(finetune, field):
            raise ValueError(
                f"checkpoint has finetune.{field} '{manifest.finetune.get(field)}' but the model is "
                f"configured for '{getattr(finetune, field)}'; set model.finetune.{field}: {manifest.finetune.get(field)}"
            )
    if manifest.base_fingerprint != base_fingerprint:
        raise ValueError(
            f"checkpoint was trained on another base (fingerprint {str(manifest.base_fingerprint)[:12]}..., "
            f"this model {base_fingerprint[:12]}...; the base path stored in the checkpoint is "
            f"{manifest.base_path!r}: point model.base.checkpoint to that base)"
        )
    return manifest
