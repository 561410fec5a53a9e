"""Per-sample results of a batch: meshes in world mm, scores on the scan's own grid, writer records.

`score_batch` voxelises each predicted surface on the source scan's grid and scores it against the
scan's own mask (`lora_sam3d.metrics.sample_metrics`); `prediction_records` builds the
`Prediction` records `MeshPredictionWriter` writes. Plain functions over a `Reconstruction` and a
collated batch, so the LightningModule's steps stay a few lines.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from lora_sam3d.data.requests.names import output_stem
from lora_sam3d.geometry import BoxMask, Mesh, mask_surface, sdf_on_grid
from lora_sam3d.inputs import Batch
from lora_sam3d.metrics import sample_metrics
from lora_sam3d.models.drawing import drawn_dice
from lora_sam3d.models.reconstructor import Reconstruction, Reconstructor

__all__ = ["SCAN_WORDS", "Prediction", "Scored", "prediction_records", "score_batch", "warn_empty"]

SCAN_WORDS = {True: "read", False: "not read", None: "n/a"}
"""The ``scan`` column: the model read the scan, did not although it can, or reads none."""


@dataclass
class Prediction:
    """One sample's result, as `predict_step` hands it to `MeshPredictionWriter`.

    Attributes:
        case_id, class_name, axis, index: which slice of which case it came from (``index`` on the
            model's resampled grid; ``file_index`` in the scan file's own numbering, for a request).
        source_image: the NIfTI the slice was read from (its grid receives the predicted mask).
        frame_to_world: (4, 4) frame units -> world RAS mm.
        sdf: (4R+1,)*3 predicted vertex SDF in frame units, negative inside.
        image, mask: (S, S) the input slice's first channel and its mask.
        views_image, views_mask: (K, S, S) every input view (the first is ``image``/``mask``), for a
            sample of several views; None for one slice.
        mesh: the predicted surface in world RAS mm.
        slice_name: how the slice is named in file names (see `stem`).
        gt_sdf, gt_mesh, metrics: the truth and the scores, when the sample has ground truth.
        scored_against: what the scores compare with: ``truth`` (a split's label) or ``request
            mask`` (the 3D mask a request gave for a new scan).
        drawn_dice: the prediction against the user's drawing on the drawn planes (no truth needed).
        on_scan: the prediction as scored, on the box of the truth's grid that holds the frame (a
            `BoxMask`): the mask a request writes when that grid is its scan's, so the mask written
            is the mask scored.
        scan_read: whether the model read the scan around the slices; None for a model that reads
            no scan. False names the outputs ``..._noscan`` (`stem`), so one run can hold a request
            with and without the scan.
    """

    case_id: str
    class_name: str
    axis: int
    index: int
    source_image: str | None
    frame_to_world: np.ndarray
    sdf: np.ndarray
    image: np.ndarray
    mask: np.ndarray
    mesh: Mesh
    slice_name: str = ""
    gt_sdf: np.ndarray | None = None
    gt_mesh: Mesh | None = None
    metrics: dict[str, float] | None = None
    scored_against: str = "truth"
    views_image: np.ndarray | None = None
    views_mask: np.ndarray | None = None
    file_index: int | None = None
    scan_read: bool | None = None
    drawn_dice: float | None = None
    on_scan: BoxMask | None = None

    @property
    def stem(self) -> str:
        """The file-name stem of this sample's outputs: ``<case>_<class>_<slice>``, the slice as
        ``axial57`` (a request's file slice) or ``axis2_slice44`` (a split's canonical slice), and
        ``_noscan`` after it when a model that reads the scan did not (`output_stem`)."""
        return output_stem(
            self.case_id,
            self.class_name,
            self.slice_name or f"axis{self.axis}_slice{self.index}",
            self.scan_read,
        )


@dataclass
class Scored:
    """One sample scored on its scan's grid: predicted and true surfaces (world mm) and the metrics."""

    mesh: Mesh
    truth: Mesh
    metrics: dict[str, float]
    prediction: BoxMask


def warn_empty(rec: Reconstruction, batch: Batch) -> None:
    """A warning per sample for which stage 1 found no surface: its prediction is empty (a failure
    where it is scored)."""
    info = batch.info
    for i, count in enumerate(rec.active_counts()):
        if count == 0:
            warnings.warn(
                f"stage 1 found no surface for {info.case_id[i]}/{info.class_name[i]} ({info.slice_name[i]}): "
                "the prediction is empty (scored as a failure where there is ground truth)",
                stacklevel=2,
            )


def score_batch(
    rec: Reconstruction,
    batch: Batch,
    tolerance_mm: float,
    meshes: list[Mesh] | None = None,
    drawn: list[float] | None = None,
) -> list[Scored | None]:
    """Per sample with ``native`` ground truth: the predicted mesh, the true mesh and the metrics on
    the scan's own grid at its own spacing (NSD at ``tolerance_mm``), with the drawn-slice Dice
    (``drawn``, computed when not given); None for a sample without."""
    frame_to_world = batch.evidence.frame_to_world
    meshes = meshes if meshes is not None else Reconstructor.meshes(rec, frame_to_world)
    natives = batch.targets.native or [None] * len(meshes)
    drawn = drawn if drawn is not None else drawn_dice(rec.sdf.detach(), batch.evidence)
    out: list[Scored | None] = []
    for i, (mesh, native) in enumerate(zip(meshes, natives, strict=True)):
        if native is None:
            out.append(None)
            continue
        sdf, to_world = rec.sdf[i].detach().float().cpu().numpy(), frame_to_world[i].cpu().numpy()
        pred = sdf_on_grid(sdf, to_world, native["affine"], native["gt"].shape)
        truth = mask_surface(native["gt"], native["affine"])
        values = sample_metrics(
            pred, native["gt"], native["spacing_mm"], tolerance_mm, mesh.vertices, truth.vertices
        )
        on_scan = BoxMask(pred, np.asarray(native["origin"]), tuple(native["shape"]), native["grid_affine"])
        out.append(Scored(mesh, truth, values | {"drawn_dice": drawn[i]}, on_scan))
    return out


def prediction_records(
    rec: Reconstruction, batch: Batch, tolerance_mm: float, reads_scan: bool = False
) -> list[Prediction]:
    """The `Prediction` of each sample, scored when it carries ground truth (``native``): a split's
    label, or the 3D mask a request gave (``scored_against``). ``reads_scan``: whether the model
    reads the scan (then each record says whether its sample carried it)."""
    warn_empty(rec, batch)
    ev, targets, info = batch.evidence, batch.targets, batch.info
    meshes = Reconstructor.meshes(rec, ev.frame_to_world)
    drawn = drawn_dice(rec.sdf.detach(), ev)
    scored = score_batch(rec, batch, tolerance_mm, meshes, drawn)
    out = []
    for i, (mesh, score) in enumerate(zip(meshes, scored, strict=True)):
        record = Prediction(
            case_id=info.case_id[i],
            class_name=info.class_name[i],
            axis=int(ev.axis[i, 0]),
            index=int(ev.index[i, 0]),
            source_image=info.source_image[i],
            frame_to_world=ev.frame_to_world[i].cpu().numpy(),
            sdf=rec.sdf[i].detach().float().cpu().numpy(),
            image=ev.image[i, 0].cpu().numpy(),
            mask=ev.mask[i, 0].cpu().numpy(),
            mesh=mesh,
            slice_name=info.slice_name[i],
            file_index=info.file_index[i] if info.file_index else None,
            scan_read=bool(info.scan_read[i]) if reads_scan and info.scan_read else None,
            drawn_dice=drawn[i],
        )
        valid = ev.valid[i].cpu()
        shown = info.shown_image[i] if info.shown_image else None  # the scan's own intensities
        if shown is not None:
            record.image = shown[0].cpu().numpy()
        if int(valid.sum()) > 1:
            record.views_image = (ev.image[i].cpu()[valid] if shown is None else shown.cpu()).numpy()
            record.views_mask = ev.mask[i].cpu()[valid].numpy()
        if score is not None:
            record.gt_mesh, values, record.on_scan = score.truth, score.metrics, score.prediction
            if targets.sdf is not None:
                record.gt_sdf = targets.sdf[i].cpu().numpy()
            record.metrics = {**values, "failed": float(any(np.isinf(v) for v in values.values()))}
            record.scored_against = (targets.scored_against or ["truth"] * len(meshes))[i]
        out.append(record)
    return out
