"""Faults injected into real `lora-sam3d` subprocesses by the tests (named in their YAML configs).

`Kill` sends SIGKILL to its own process, the same signal as ``kill -9`` from a shell or an
out-of-memory killer, at a chosen training step or in the middle of writing a checkpoint file (it
writes half of the serialised bytes, flushes them, then dies). `DDPProbe` records what DDP reduces.
"""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Kill(L.Callback):
    """SIGKILL at the start of training step ``at_step``, or during the ``nth`` write of a file whose
    final name is ``in_save_of`` (the temporary file is named after it, see `lora_sam3d.io.atomic`)."""

    def __init__(self, at_step: int | None = None, in_save_of: str | None = None, nth: int = 1) -> None:
        self.at_step, self.in_save_of, self.nth = at_step, in_save_of, nth

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.in_save_of is None:
            return
        real_save, seen = torch.save, [0]
        prefix = f".{self.in_save_of}."

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            name = Path(f).name if isinstance(f, (str, os.PathLike)) else ""
            if name == self.in_save_of or name.startswith(prefix):
                seen[0] += 1
                if seen[0] == self.nth:
                    buf = io.BytesIO()
                    real_save(obj, buf, *args, **kwargs)
                    with open(f, "wb") as out:
                        out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                        out.flush()
                        os.fsync(out.fileno())
                    _die()
            real_save(obj, f, *args, **kwargs)

        torch.save = save

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.at_step:
            _die()


class DDPProbe(L.Callback):
    """At fit start, write ``<path>-rank<r>.json``: the bytes of parameters DDP's reducer
    all-reduces (torch's own DDP logging data) and the module's trainable and frozen bytes."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ddp = trainer.strategy.model
        data = ddp._get_ddp_logging_data()

        def nbytes(trainable: bool) -> int:
            return sum(
                p.numel() * p.element_size() for p in pl_module.parameters() if p.requires_grad == trainable
            )

        info = {
            "wrapper": type(ddp).__name__,
            "reduced_bytes": int(data["total_parameter_size_bytes"]),
            "reduced_tensors": int(data["num_parameter_tensors"]),
            "trainable_bytes": nbytes(True),
            "trainable_tensors": sum(1 for p in pl_module.parameters() if p.requires_grad),
            "frozen_bytes": nbytes(False),
        }
        Path(f"{self.path}-rank{trainer.global_rank}.json").write_text(json.dumps(info))


class WrittenProbe(L.Callback):
    """At predict end, write ``<path>-rank<r>.json``: the files this process's `MeshPredictionWriter`
    wrote (so a test can see which process wrote which file)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lora_sam3d.callbacks import MeshPredictionWriter

        writer = next(c for c in trainer.callbacks if isinstance(c, MeshPredictionWriter))
        Path(f"{self.path}-rank{trainer.global_rank}.json").write_text(
            json.dumps([str(p) for p in writer.written])
        )
