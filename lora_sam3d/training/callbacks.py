"""Lightning callbacks of training: adapter folders as checkpoints, a run summary, a merged decoder at
the end, the run's config saved at its start."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerFn

from lora_sam3d.io.atomic import atomic_write
from lora_sam3d.models.adapters.files import save_model_adapter

__all__ = [
    "AdapterCheckpoint",
    "MergeOnEnd",
    "RunSummary",
    "SaveConfigOnStart",
    "save_adapter_of",
]


def _output_dir(trainer: L.Trainer, name: str) -> Path:
    ckpt = getattr(trainer, "checkpoint_callback", None)
    base = (
        Path(ckpt.dirpath)
        if ckpt is not None and getattr(ckpt, "dirpath", None)
        else Path(trainer.default_root_dir)
    )
    return base / name


class SaveConfigOnStart(SaveConfigCallback):
    """LightningCLI's ``config.yaml``, written when the run has started and atomically.

    Lightning's callback writes it in ``setup``, before the model's own ``setup`` and the first
    batch, so a run that fails to start (a bad adapter, a class mismatch) would already have
    replaced the previous run's file. Here it is written when the first batch (training, validation,
    test or prediction) has been loaded, through a temporary file and a rename.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stage = stage

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.already_saved:
            return
        if self.save_to_log_dir:
            path = Path(trainer.log_dir or trainer.default_root_dir) / self.config_filename
            exists = trainer.strategy.broadcast(path.is_file() if trainer.is_global_zero else False)
            if exists and not self.overwrite:
                raise RuntimeError(f"{path} exists and save_config_kwargs has overwrite: false")
            if trainer.is_global_zero:
                text = self.parser.dump(self.config, skip_none=False)
                atomic_write(path, lambda tmp: tmp.write_text(text))
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, self._stage)
        self.already_saved = trainer.strategy.broadcast(True)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._write(trainer, pl_module)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._write(trainer, pl_module)

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._write(trainer, pl_module)

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._write(trainer, pl_module)


class AdapterCheckpoint(L.Callback):
    """After each validation during ``fit``, write ``adapter-last/`` and (when ``monitor`` improves) ``adapter-best/``.

    Each folder holds the decoder's ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT's
    layout, see `lora_sam3d.lora.save_adapter`) and stage 1's adapter in ``structure/`` (see
    `lora_sam3d.models.adapters.files.save_model_adapter`), next to Lightning's checkpoints; written atomically,
    on rank 0.
    """

    def __init__(
        self, monitor: str = "val/dice", mode: Literal["max", "min"] = "max", dirpath: str | None = None
    ) -> None:
        self.monitor, self.mode, self.dirpath = monitor, mode, dirpath
        self.best: float | None = None

    def _save(self, trainer: L.Trainer, module: Any, name: str) -> None:
        out = Path(self.dirpath) / name if self.dirpath else _output_dir(trainer, name)
        save_adapter_of(module, out)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (
            trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or not trainer.is_global_zero
            or getattr(getattr(pl_module, "finetune", None), "mode", None) != "lora"
        ):
            return
        self._save(trainer, pl_module, "adapter-last")
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or not math.isfinite(float(value)):
            return
        value = float(value)
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best = value
            self._save(trainer, pl_module, "adapter-best")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")


class RunSummary(L.Callback):
    """At the end of fit, write ``run_summary.json`` beside the checkpoints: wall time of fit, peak
    resident memory of the process (Linux ``VmHWM``), parameter counts and the adapter's size (the
    weight files of both stages in ``adapter-best/``)."""

    def __init__(self) -> None:
        self.start = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import time

        self.start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import time

        from lora_sam3d.lora import count_parameters

        if not trainer.is_global_zero:
            return
        peak = None
        status = Path("/proc/self/status")
        if status.is_file():
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM"):
                    peak = int(line.split()[1]) * 1024
        adapter = _output_dir(trainer, "adapter-best")  # the decoder's and stage 1's weights
        summary = {
            "train_seconds": time.perf_counter() - self.start,
            "peak_rss_bytes": peak,
            "global_step": trainer.global_step,
            **{f"{k}_params": v for k, v in count_parameters(pl_module).items()},
            "adapter_bytes": sum(p.stat().st_size for p in adapter.rglob("*.safetensors"))
            if adapter.is_dir()
            else None,
        }
        text = json.dumps(summary, indent=2)
        atomic_write(_output_dir(trainer, "run_summary.json"), lambda tmp: tmp.write_text(text))


class MergeOnEnd(L.Callback):
    """At the end of fit, write the decoder with LoRA merged in (``decoder-merged.safetensors``), rank 0.

    The file has the reference's names and layout: Meta's `SLatMeshDecoder` loads it as it is.
    """

    def __init__(self, filename: str = "decoder-merged.safetensors") -> None:
        self.filename = filename

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            pl_module.model.save_merged(_output_dir(trainer, self.filename))


def save_adapter_of(module: Any, directory: Path) -> Path:
    """A `LoRAMeshDecoderModule`'s adapter folder: its model's adapters, classes, unfrozen modules and
    data settings (see `lora_sam3d.models.adapters.files.save_model_adapter`)."""
    return save_model_adapter(module.model, directory, module.manifest())
