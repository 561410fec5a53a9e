"""What predict writes per sample, one small writer object per kind of file, each naming its files.

`MeshPredictionWriter` (`lora_sam3d.callbacks`) runs the writers it is configured with on every
`Prediction`; the check that refuses a folder holding an earlier predict's files reads the file
patterns of every kind in `OUTPUT_KINDS` (configured or not, since an earlier run may have written
others) and `SUMMARY_FILES`, so a new kind of output is declared in one place. The files themselves
are written by `lora_sam3d.predict.files` (temporary name, then rename).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from lora_sam3d.geometry import CoordinateSystem, Mesh, MeshFormat
from lora_sam3d.predict.files import mask_on_source_grid, preview_png, write_nifti
from lora_sam3d.predict.records import Prediction

__all__ = [
    "OUTPUT_KINDS",
    "SUMMARY_FILES",
    "MaskFile",
    "MeshFiles",
    "PreviewFile",
    "SampleOutput",
    "earlier_outputs",
]

SUMMARY_FILES = ("metrics.csv", "metrics.json", "report.html")
"""The files written once per predict, after every sample."""


class SampleOutput:
    """One kind of file written per predicted sample; ``patterns`` (globs) find those files in a folder."""

    patterns: ClassVar[tuple[str, ...]] = ()

    def write(self, record: Prediction, mesh: Mesh, folder: Path) -> list[Path]:
        """Write ``record``'s files (``mesh``: the prediction as written, e.g. smoothed) into ``folder``."""
        raise NotImplementedError

    @classmethod
    def earlier(cls, folder: Path) -> set[Path]:
        """The files of this kind already in ``folder``."""
        return {p for pattern in cls.patterns for p in folder.glob(pattern) if p.is_file()}


@dataclass
class MeshFiles(SampleOutput):
    """``<stem>.<format>``, the predicted surface (``<stem>_beyond_scan.<format>`` when it was kept past
    the scan's field of view), and ``<stem>_truth.<format>`` where there is truth."""

    mesh_format: MeshFormat = "ply"
    coordinate_system: CoordinateSystem = "RAS"
    patterns: ClassVar[tuple[str, ...]] = ("*.ply", "*.stl", "*.obj")

    def write(self, record: Prediction, mesh: Mesh, folder: Path) -> list[Path]:
        written = []
        own = "_beyond_scan" if record.mesh_beyond_scan else ""  # asked to keep the surface past the scan
        for surface, suffix in ((mesh, own), (record.gt_mesh, "_truth")):
            if surface is not None and not surface.is_empty:
                path = folder / f"{record.stem}{suffix}.{self.mesh_format}"
                written.append(surface.save(path, self.coordinate_system))
        return written


@dataclass
class MaskFile(SampleOutput):
    """``<stem>_mask.nii.gz``: the predicted mask on the source scan's own grid."""

    patterns: ClassVar[tuple[str, ...]] = ("*_mask.nii.gz",)

    def write(self, record: Prediction, mesh: Mesh, folder: Path) -> list[Path]:
        if not record.source_image:
            return []
        img = mask_on_source_grid(record.sdf, record.frame_to_world, record.source_image, record.on_scan)
        return [write_nifti(img, folder / f"{record.stem}_mask.nii.gz")]


@dataclass
class PreviewFile(SampleOutput):
    """``<stem>.png``: the input slice, and the prediction against the truth through it."""

    patterns: ClassVar[tuple[str, ...]] = ("*.png",)

    def write(self, record: Prediction, mesh: Mesh, folder: Path) -> list[Path]:
        truth = " vs truth (green)" if record.gt_sdf is not None else ""
        title = f"{record.stem}  input | prediction (red){truth}"
        path = folder / f"{record.stem}.png"
        return [preview_png(record.image, record.mask, record.sdf, record.axis, record.gt_sdf, path, title)]

    @classmethod
    def earlier(cls, folder: Path) -> set[Path]:
        """Only the PNGs beside a predicted mesh are ours: a folder may hold other pictures."""
        meshes = MeshFiles.earlier(folder)
        return {p.with_suffix(".png") for p in meshes if p.with_suffix(".png").is_file()}


OUTPUT_KINDS: tuple[type[SampleOutput], ...] = (MeshFiles, MaskFile, PreviewFile)
"""Every kind of per-sample output predict can write."""


def earlier_outputs(folder: Path) -> list[Path]:
    """The prediction files already in ``folder``: every kind's files and the summary files."""
    if not folder.is_dir():
        return []
    found = {folder / name for name in SUMMARY_FILES if (folder / name).is_file()}
    for kind in OUTPUT_KINDS:
        found |= kind.earlier(folder)
    return sorted(found)
