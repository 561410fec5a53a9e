"""Lightning callbacks that write what users keep: adapters, predicted meshes and masks, a merged decoder."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from lora_sam3d.atomic import atomic_write
from lora_sam3d.geometry import CoordinateSystem, Mesh, MeshFormat
from lora_sam3d.models.adapter_files import save_model_adapter
from lora_sam3d.outputs import MaskFile, MeshFiles, PreviewFile, SampleOutput, earlier_outputs
from lora_sam3d.predictions import Prediction
from lora_sam3d.report import ReportEntry, ReportSample, entry, write_report

__all__ = [
    "AdapterCheckpoint",
    "MergeOnEnd",
    "MeshPredictionWriter",
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
    `lora_sam3d.models.adapter_files.save_model_adapter`), next to Lightning's checkpoints; written atomically,
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
    data settings (see `lora_sam3d.models.adapter_files.save_model_adapter`)."""
    return save_model_adapter(module.model, directory, module.manifest())


class MeshPredictionWriter(BasePredictionWriter):
    """Per predicted sample: a mesh in world coordinates (and ``_truth`` beside it when ground truth
    exists), the mask as NIfTI on the source scan's grid, a PNG preview; at the end,
    ``metrics.csv`` and ``metrics.json`` when ground truth existed.

    Under DDP each process writes the files of the samples it predicted (each sample is predicted
    by exactly one process, so no file is written twice) and rank 0 alone writes the metrics of
    all samples, gathered from every process.

    Args:
        output_dir: where to write (default ``<trainer.default_root_dir>/predictions``).
        mesh_format: ``ply`` (default), ``stl`` or ``obj``.
        coordinate_system: ``RAS`` (default) or ``LPS`` for the mesh vertices, stated in the file.
        write_nifti / write_png: turn those outputs off.
        smooth_iterations: Taubin smoothing of the written predicted meshes (0: off); metrics are
            computed on the unsmoothed prediction before.
        report: write ``report.html`` (see `lora_sam3d.report`); up to ``report_views`` samples can be
            opened in its 3D viewer (the first predicted), every sample gets a table row.
        overwrite: a folder holding an earlier predict's outputs is refused before anything runs
            (its report and metrics would describe a mix of both runs); ``true``: those outputs are
            removed first, so the folder holds this run's files only.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        mesh_format: MeshFormat = "ply",
        coordinate_system: CoordinateSystem = "RAS",
        write_nifti: bool = True,
        write_png: bool = True,
        smooth_iterations: int = 10,
        report: bool = True,
        report_views: int = 40,
        overwrite: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir, self.overwrite = output_dir, overwrite
        self.outputs: list[SampleOutput] = [MeshFiles(mesh_format, coordinate_system)]
        self.outputs += [MaskFile()] if write_nifti else []
        self.outputs += [PreviewFile()] if write_png else []
        self.smooth_iterations, self.report, self.report_views = smooth_iterations, report, report_views
        self.samples: list[ReportEntry] = []
        self.rows: list[dict[str, Any]] = []
        self.written: list[Path] = []

    def _dir(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir) if self.output_dir else Path(trainer.default_root_dir) / "predictions"

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows, self.written, self.samples = [], [], []
        folder = self._dir(trainer)
        earlier = earlier_outputs(folder)
        if earlier and not self.overwrite:
            raise FileExistsError(
                f"{folder} holds the outputs of an earlier predict ({len(earlier)} files, e.g. {earlier[0].name}): "
                "set overwrite: true on MeshPredictionWriter to replace them, or give another output_dir"
            )
        if earlier and trainer.is_global_zero:
            for path in earlier:
                path.unlink(missing_ok=True)
        trainer.strategy.barrier()

    def write_on_batch_end(
        self,
        trainer,
        pl_module,
        prediction: list[Prediction],
        batch_indices,
        batch,
        batch_idx,
        dataloader_idx,
    ) -> None:  # type: ignore[override]
        out = self._dir(trainer)
        for record in prediction:
            mesh = record.mesh.smoothed(self.smooth_iterations)
            for output in self.outputs:
                self.written += output.write(record, mesh, out)
            self.rows.append(metrics_row(record))  # every sample: its drawn-slice Dice needs no truth
            if self.report:  # compact: only what the page shows, a 3D view for the first report_views
                self.samples.append(
                    entry(report_sample(record, mesh), view=len(self.samples) < self.report_views)
                )

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Gather every process's per-sample metrics (and report entries); rank 0 writes ``metrics.csv``,
        ``metrics.json`` and ``report.html``."""
        if self.report:
            samples = sorted(_from_all_processes(trainer, self.samples), key=lambda s: s.stem)
            for extra in [s for s in samples if s.view][self.report_views :]:
                extra.view = None  # each process kept its first report_views; the page shows report_views
            if samples and trainer.is_global_zero:
                title = f"lora-sam3d predictions ({len(samples)} sample{'s' if len(samples) != 1 else ''})"
                self.written.append(write_report(self._dir(trainer) / "report.html", samples, title))
        if trainer.world_size > 1:
            self.rows = sorted(
                _from_all_processes(trainer, self.rows),
                key=lambda r: (r["case_id"], r["class_name"], r["axis"], r["grid_index"]),
            )
        if not self.rows or not trainer.is_global_zero:
            return
        out = self._dir(trainer)
        buf = io.StringIO()
        columns = list(dict.fromkeys(k for row in self.rows for k in row))  # scored rows have more
        writer = csv.DictWriter(buf, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        text = buf.getvalue()
        self.written.append(atomic_write(out / "metrics.csv", lambda tmp: tmp.write_text(text)))
        summary = {"samples": self.rows, "mean": _means(self.rows)}
        js = json.dumps(summary, indent=2, allow_nan=True)
        self.written.append(atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(js)))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts: dict[str, int] = {}
        for path in _from_all_processes(trainer, self.written):  # every process's files
            kind = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
            counts[kind] = counts.get(kind, 0) + 1
        summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        rank_zero_info(f"predictions written to {self._dir(trainer)}: {summary}")
        scored = [r for r in self.rows if r.get("dice") not in (None, "")]
        if scored:
            means = _means(scored)
            rank_zero_info(
                "mean over {} samples: Dice {:.3f}, HD95 {:.1f} mm, ASSD {:.1f} mm, NSD@{}mm {:.3f}; "
                "on the drawn slices Dice {:.3f}".format(
                    len(scored),
                    means["dice"],
                    means["hd95_mm"],
                    means["assd_mm"],
                    pl_module.steps.nsd_tolerance_mm,
                    means["nsd"],
                    means["drawn_dice"],
                )
            )
        elif self.rows:
            rank_zero_info(
                f"{len(self.rows)} samples without truth (not scored); on the drawn slices Dice "
                f"{_means(self.rows)['drawn_dice']:.3f}"
            )


SCAN_WORDS = {True: "read", False: "not read", None: "n/a"}
"""The ``scan`` column: the model read the scan, did not although it can, or reads none."""


def metrics_row(record: Prediction) -> dict[str, Any]:
    """A sample's row of ``metrics.csv``: which slice of which case, what it was scored against, the scores."""
    return {
        "case_id": record.case_id,
        "class_name": record.class_name,
        "axis": record.axis,
        "grid_index": record.index,
        "file_index": "" if record.file_index is None else record.file_index,
        "slice": record.slice_name or f"axis{record.axis}_slice{record.index}",
        "scan": SCAN_WORDS[record.scan_read],
        "scored_against": record.scored_against if record.metrics is not None else "",
        "drawn_dice": record.drawn_dice,
        **(record.metrics or {}),
    }


def report_sample(record: Prediction, mesh: Mesh) -> ReportSample:
    """What the report shows of a sample: its input slices, the written mesh, truth and scores."""
    return ReportSample(
        record.stem,
        record.case_id,
        record.class_name,
        record.slice_name or f"axis{record.axis} slice{record.index}",
        mesh,
        record.image if record.views_image is None else record.views_image,
        record.mask if record.views_mask is None else record.views_mask,
        record.gt_mesh,
        record.metrics,
        record.scored_against,
        SCAN_WORDS[record.scan_read],
        record.drawn_dice,
    )


def _from_all_processes(trainer: L.Trainer, items: list[Any]) -> list[Any]:
    """The concatenation of ``items`` over all processes (just ``items`` without a process group)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return list(items)
    gathered: list[list[Any]] = [[] for _ in range(trainer.world_size)]
    torch.distributed.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def _means(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = [
        k
        for k in dict.fromkeys(k for r in rows for k in r)
        if k
        not in (
            "case_id",
            "class_name",
            "axis",
            "grid_index",
            "file_index",
            "slice",
            "scan",
            "scored_against",
        )
    ]
    out = {}
    for k in keys:
        given = [r[k] for r in rows if r.get(k) not in (None, "")]  # rows without truth lack its scores
        values = torch.tensor([float(v) for v in given], dtype=torch.float64)
        finite = values[torch.isfinite(values)]
        out[k] = float(finite.mean()) if len(finite) else math.nan
    return out
