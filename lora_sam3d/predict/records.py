"""Per-sample results of a batch: meshes in world mm, scores on the scan's own grid, writer records.

`score_batch` voxelises each predicted surface on the source scan's grid and scores it against the
scan's own mask (`lora_sam3d.metrics.sample_metrics`); `prediction_records` builds the
`Prediction` records `MeshPredictionWriter` writes. Plain functions over a `Reconstruction` and a
collated batch, so the LightningModule's steps stay a few lines.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from functools import lru_cache

import nibabel as nib
import numpy as np
import torch

from lora_sam3d.data.requests.names import output_stem
from lora_sam3d.geometry import BoxMask, Mesh, frame_box, frame_vertices_on, mask_surface, sdf_on_box
from lora_sam3d.inputs import Batch, RequestNotes
from lora_sam3d.metrics import sample_metrics
from lora_sam3d.models.drawing import drawn_dice
from lora_sam3d.models.reconstructor import Reconstruction, Reconstructor
from lora_sam3d.predict.surface import beyond_scan_mm, cut_at_scan, keep_drawn_pieces, scan_box_sdf

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
        sdf: (4R+1,)*3 predicted vertex SDF in frame units, negative inside (its pieces away from
            the drawing removed; the mesh is also cut at the scan's field of view).
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
        modality: how a request's scan was read (``ct``, ``mr``; None for a split's sample).
        frame: where a request's frame extent came from, and the extent (None for a split's sample).
        pieces_removed: pieces of the prediction that touched no drawn mask, removed (`keep_drawn_pieces`).
        beyond_scan_mm: how far the network's surface reached past the scan's field of view.
        mesh_beyond_scan: the surface was kept past the scan (asked for): the mesh file says so in
            its name (``<stem>_beyond_scan``); otherwise it is cut and closed at the scan.
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
    modality: str | None = None
    frame: str | None = None
    pieces_removed: int = 0
    beyond_scan_mm: float = 0.0
    mesh_beyond_scan: bool = False

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
    (``drawn``, computed when not given); None for a sample without. A request's drawn slices are
    its drawing on the scan's grid (`RequestNotes.drawing`), as the mask it writes."""
    frame_to_world = batch.evidence.frame_to_world
    meshes = meshes if meshes is not None else Reconstructor.meshes(rec, frame_to_world)
    natives = batch.targets.native or [None] * len(meshes)
    notes = batch.info.request or [None] * len(meshes)
    drawn = drawn if drawn is not None else drawn_dice(rec.sdf.detach(), batch.evidence)
    out: list[Scored | None] = []
    for i, (mesh, native) in enumerate(zip(meshes, natives, strict=True)):
        if native is None:
            out.append(None)
            continue
        sdf, to_world = rec.sdf[i].detach().float().cpu().numpy(), frame_to_world[i].cpu().numpy()
        lo = np.asarray(native["origin"])  # the truth's box on the scan's grid: voxelised there, once
        on_scan = sdf_on_box(
            sdf, to_world, native["grid_affine"], tuple(native["shape"]), (lo, lo + native["gt"].shape)
        )
        _paint(on_scan, notes[i])
        truth = mask_surface(native["gt"], native["affine"])
        values = sample_metrics(
            on_scan.box, native["gt"], native["spacing_mm"], tolerance_mm, mesh.vertices, truth.vertices
        )
        out.append(Scored(mesh, truth, values | {"drawn_dice": drawn[i]}, on_scan))
    return out


def _paint(mask: BoxMask, notes: RequestNotes | None) -> None:
    """A request's drawn slices, exactly, on its mask on the scan's grid."""
    for axis, index, plane in (notes.drawing or []) if notes else []:
        mask.paint(axis, index, plane)


@lru_cache(maxsize=16)
def _header_grid(path: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    img = nib.load(path)  # the header only
    return np.asarray(img.affine, dtype=float), tuple(int(v) for v in img.shape[:3])  # type: ignore[return-value]


def _scan_grid(batch: Batch, i: int) -> tuple[np.ndarray, tuple[int, int, int]] | None:
    """Sample ``i``'s scan grid (affine, shape): its truth's grid, else its source file's header."""
    native = (batch.targets.native or [None] * len(batch))[i]
    if native is not None:
        return np.asarray(native["grid_affine"], dtype=float), tuple(int(v) for v in native["shape"])  # type: ignore[return-value]
    path = batch.info.source_image[i]
    return _header_grid(str(path)) if path else None


def finished(
    rec: Reconstruction, batch: Batch
) -> tuple[Reconstruction, torch.Tensor, list[int], list[float]]:
    """The network's SDF made into the result (`lora_sam3d.predict.surface`): pieces touching no
    drawn mask removed (the returned reconstruction: what the masks and scores read), and the
    SDFs the meshes are made from, also cut and closed at the scan's field of view, unless a
    request asks to keep either (`RequestNotes`). Also, per sample, the pieces removed and how far
    the uncut surface reached past the scan (mm). The masks need no cut: the scan's voxels are
    its field of view (cutting the vertex grid would only blur the last voxel's interpolation)."""
    ev = batch.evidence
    notes = batch.info.request or [None] * len(batch)
    sdf, removed = keep_drawn_pieces(rec.sdf.detach(), ev)
    n = sdf.shape[-1] - 1
    beyond, cut = [], sdf.clone()
    for i, note in enumerate(notes):
        if note is not None and note.all_pieces:
            sdf[i], cut[i], removed[i] = rec.sdf[i].detach(), rec.sdf[i].detach(), 0
        grid = _scan_grid(batch, i)
        if grid is None:
            beyond.append(0.0)
            continue
        to_world = ev.frame_to_world[i].cpu().numpy()
        box = scan_box_sdf(n, to_world, *grid)
        beyond.append(beyond_scan_mm(sdf[i], box, to_world))
        if not (note is not None and note.beyond_scan):
            cut[i] = cut_at_scan(sdf[i], box)
    return replace(rec, sdf=sdf), cut, removed, beyond


def _request_mask(record: Prediction, notes: RequestNotes) -> BoxMask | None:
    """A request's mask on its scan's grid when it has no truth to be scored against: the frame's
    box (grown to hold the drawing), the drawing painted on its slices."""
    if not record.source_image:
        return None
    affine, shape = _header_grid(str(record.source_image))
    lo, hi = frame_box(record.frame_to_world, affine, shape)
    for axis, index, plane in notes.drawing or []:
        rows = [np.flatnonzero(np.asarray(plane).any(axis=1 - j)) for j in range(2)]
        if not all(r.size for r in rows):
            continue
        p, q = (a for a in range(3) if a != axis)
        lo[axis], hi[axis] = min(lo[axis], index), max(hi[axis], index + 1)
        lo[p], hi[p] = min(lo[p], rows[0][0]), max(hi[p], rows[0][-1] + 1)
        lo[q], hi[q] = min(lo[q], rows[1][0]), max(hi[q], rows[1][-1] + 1)
    mask = sdf_on_box(record.sdf, record.frame_to_world, affine, shape, (lo, hi))
    _paint(mask, notes)
    return mask


def prediction_records(
    rec: Reconstruction, batch: Batch, tolerance_mm: float, reads_scan: bool = False
) -> list[Prediction]:
    """The `Prediction` of each sample (`finished`: what the outputs keep of the network's SDF),
    scored when it carries ground truth (``native``): a split's label, or the 3D mask a request
    gave (``scored_against``). ``reads_scan``: whether the model reads the scan (then each record
    says whether its sample carried it)."""
    warn_empty(rec, batch)
    rec, cut, removed, beyond = finished(rec, batch)
    ev, targets, info = batch.evidence, batch.targets, batch.info
    notes = info.request or [None] * len(batch)
    meshes = Reconstructor.meshes(replace(rec, sdf=cut), ev.frame_to_world)
    drawn = drawn_dice(rec.sdf, ev)
    scored = score_batch(rec, batch, tolerance_mm, meshes, drawn)
    out = []
    for i, (mesh, score) in enumerate(zip(meshes, scored, strict=True)):
        note = notes[i]
        record = Prediction(
            case_id=info.case_id[i],
            class_name=info.class_name[i],
            axis=int(ev.axis[i, 0]),
            index=int(ev.index[i, 0]),
            source_image=info.source_image[i],
            frame_to_world=ev.frame_to_world[i].cpu().numpy(),
            sdf=rec.sdf[i].float().cpu().numpy(),
            image=ev.image[i, 0].cpu().numpy(),
            mask=ev.mask[i, 0].cpu().numpy(),
            mesh=mesh,
            slice_name=info.slice_name[i],
            file_index=info.file_index[i] if info.file_index else None,
            scan_read=bool(info.scan_read[i]) if reads_scan and info.scan_read else None,
            drawn_dice=drawn[i],
            modality=note.modality if note else None,
            frame=note.frame if note else None,
            pieces_removed=removed[i],
            beyond_scan_mm=beyond[i],
            mesh_beyond_scan=bool(note and note.beyond_scan),
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
            else:  # a request's 3D mask: the previews show it through the frame
                record.gt_sdf = _truth_on_frame(targets.native[i], record.frame_to_world, record.sdf.shape[0])  # type: ignore[index]
            record.metrics = {**values, "failed": float(any(np.isinf(v) for v in values.values()))}
            record.scored_against = (targets.scored_against or ["truth"] * len(meshes))[i]
        elif note is not None:
            record.on_scan = _request_mask(record, note)
        out.append(record)
    return out


def _truth_on_frame(native: dict, frame_to_world: np.ndarray, size: int) -> np.ndarray:
    """(size,)^3: -1 where the frame's vertex grid lies in a scan's mask (``native``), else 1."""
    vox = np.rint(frame_vertices_on(size - 1, frame_to_world, native["affine"])).astype(int)
    gt = np.asarray(native["gt"], dtype=bool)
    inside = np.all((vox >= 0) & (vox < np.asarray(gt.shape)), axis=1)
    values = np.ones(len(vox), dtype=np.float32)
    hit = vox[inside]
    values[np.flatnonzero(inside)[gt[hit[:, 0], hit[:, 1], hit[:, 2]]]] = -1.0
    return values.reshape(size, size, size)
