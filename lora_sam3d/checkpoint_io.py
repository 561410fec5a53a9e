"""`AtomicCheckpointIO`: Lightning checkpoints written beside their final name, synced, then renamed.

Lightning's own `TorchCheckpointIO` writes through an fsspec transaction whose temporary file lives
in the system temp folder; when that folder is on another filesystem than the checkpoints (a
node's local /tmp vs a shared volume, the usual case on clusters) the final step is a copy into
the final name, so a run killed during that copy leaves a truncated ``last.ckpt`` that
``--ckpt_path last`` then picks up. Writing the temporary file in the checkpoint folder and
renaming it there is atomic on every POSIX filesystem. The temporary name starts with a dot, so
Lightning's search for ``last*.ckpt`` never takes it for a checkpoint.

Loading turns torch's errors for truncated files and for pickles that would run code into one
`ValueError` that names the file and says which it is.

The `lora-sam3d` command installs it by default (``trainer.plugins``); Python users pass
``Trainer(plugins=[AtomicCheckpointIO()])``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lora_sam3d.atomic import atomic_write
from lora_sam3d.models.decoder import unreadable


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
        if not Path(path).is_file() and "://" not in str(path):
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as err:
            raise unreadable(path, err) from err
