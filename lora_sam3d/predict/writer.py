"""The callback `predict` runs: each sample's files as it is predicted, then the tables and the report
of all of them, gathered from every process under DDP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lora_sam3d.geometry import CoordinateSystem, MeshFormat
from lora_sam3d.predict.outputs import MaskFile, MeshFiles, PreviewFile, SampleOutput, earlier_outputs
from lora_sam3d.predict.records import Prediction
from lora_sam3d.predict.report import ReportEntry, entry, report_sample, write_report
from lora_sam3d.predict.table import means, metrics_row, write_tables

__all__ = ["MeshPredictionWriter"]


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
        report: write ``report.html`` (see `lora_sam3d.predict.report`); up to ``report_views`` samples can be
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
            record.on_scan = None  # written: the trainer's kept predictions need not hold it (scan-sized)
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
        self.written += write_tables(self.rows, self._dir(trainer))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts: dict[str, int] = {}
        for path in _from_all_processes(trainer, self.written):  # every process's files
            kind = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
            counts[kind] = counts.get(kind, 0) + 1
        summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        rank_zero_info(f"predictions written to {self._dir(trainer)}: {summary}")
        scored = [r for r in self.rows if r.get("dice") not in (None, "")]
        if scored:
            mean = means(scored)
            rank_zero_info(
                "mean over {} samples: Dice {:.3f}, HD95 {:.1f} mm, ASSD {:.1f} mm, NSD@{}mm {:.3f}; "
                "on the drawn slices Dice {:.3f}".format(
                    len(scored),
                    mean["dice"],
                    mean["hd95_mm"],
                    mean["assd_mm"],
                    pl_module.steps.nsd_tolerance_mm,
                    mean["nsd"],
                    mean["drawn_dice"],
                )
            )
        elif self.rows:
            rank_zero_info(
                f"{len(self.rows)} samples without truth (not scored); on the drawn slices Dice "
                f"{means(self.rows)['drawn_dice']:.3f}"
            )


def _from_all_processes(trainer: L.Trainer, items: list[Any]) -> list[Any]:
    """The concatenation of ``items`` over all processes (just ``items`` without a process group)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return list(items)
    gathered: list[list[Any]] = [[] for _ in range(trainer.world_size)]
    torch.distributed.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]
