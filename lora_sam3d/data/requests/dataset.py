"""`PredictionDataset`: requests on new scans checked once in the main process (each bad one
reported by its number), then turned into the model's input on its canonical isotropic grid."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset

from lora_sam3d.data.cases import check_class_names
from lora_sam3d.data.frame import sample_context
from lora_sam3d.data.nifti import DataError, canonical_grid
from lora_sam3d.data.requests.drawing_checks import check_marked_tissue, warn_at_edge
from lora_sam3d.data.requests.items import (
    PredictItem,
    SliceRef,
    as_given,
    file_slices_read,
    grid_slice,
    locate_slice,
    parse_axis,
)
from lora_sam3d.data.requests.masks import (
    apart_pairs,
    contradicting_pairs,
    frame_side_mm,
    mask_exists,
    read_mask_volume,
    read_slice_mask,
    request_frame,
)
from lora_sam3d.data.requests.names import case_names, output_stem
from lora_sam3d.data.sample import native_from_mask, recentred, slice_frame, slice_sample
from lora_sam3d.data.settings import Context, DataContract, FrameFrom
from lora_sam3d.data.tissue import (
    relative_sample,
    views_inside,
)
from lora_sam3d.data.tissue_forest import with_tissue_model
from lora_sam3d.data.views import seen_centre
from lora_sam3d.data.volume import (
    IsotropicGrid,
    Preprocessing,
    Volume,
    load_image,
    load_labels,
    modality_line,
    read_modality,
)
from lora_sam3d.inputs import RequestNotes, Sample

__all__ = [
    "ANY_STRUCTURE",
    "PredictionDataset",
]

log = logging.getLogger("lora_sam3d")

ANY_STRUCTURE = "structure"
"""The class name of a request that names none (its frame comes from the drawing)."""


class PredictionDataset(Dataset):
    """Input samples (no ground truth) for `PredictItem`s.

    Each request's slice is located in its file and its mask read when the dataset is built; a
    sample is then the model's input on the canonical grid resampled to ``prep.spacing_mm``, at the
    canonical slice through the file slice's plane.
    """

    def __init__(
        self,
        items: Sequence[PredictItem | Mapping[str, Any]],
        prep: Preprocessing,
        extent_mm: Mapping[str, float],
        frame_scale: float,
        slice_size: int,
        intensity_check: Literal["warn", "error"] = "warn",
        context: Context = "none",
        context_cells: int = 64,
        scan_readable: bool | None = None,
        tissue: Mapping[str, Sequence[float]] | None = None,
        reading: str = "absolute",
        trained_classes: Sequence[str] | None = None,
        all_pieces: bool = False,
        beyond_scan: bool = False,
        scans: dict[str, dict[str, Any]] | None = None,
        frame_from: FrameFrom = "auto",
        tissue_model: str = "none",
    ) -> None:
        self.tissue_model = tissue_model  # the context's per-request tissue model (`with_tissue_model`)
        # "auto": several slices sized by their drawing, which measures the structure (`request_frame`)
        self.frame_from = frame_from
        self.frames: list[tuple[str, float]] = []  # per item: where its frame's extent came from, mm
        # per scan path, what reading it gave (its modality, its normalised image on the model's
        # grid): a caller's dict, kept across datasets, makes later requests on a scan skip both
        self.scans = {} if scans is None else scans
        # the classes the model learned (None: unknown, as for a config without a trained model)
        self.trained_classes = None if trained_classes is None else list(trained_classes)
        self.all_pieces, self.beyond_scan = all_pieces, beyond_scan
        self.tissue = dict(tissue or {})  # per class, the training scans' tissue (`tissue_ranges`)
        self.reading = reading  # how the model reads the scan (`ContextSettings.reading`)
        self.intensity_check = intensity_check
        self.context, self.context_cells = context, context_cells
        # whether the model reads the scan at all (then a request without it is named ..._noscan)
        self.scan_readable = context == "volume" if scan_readable is None else scan_readable
        self.items = [i if isinstance(i, PredictItem) else PredictItem(**i) for i in items]
        self.prep, self.extent_mm, self.frame_scale = prep, dict(extent_mm), frame_scale
        self.slice_size = slice_size
        self.slices: list[list[SliceRef]] = []  # per item, its views (the first places the frame)
        self.masks: list[list[np.ndarray]] = []
        self.grids: list[IsotropicGrid] = []  # per item, the model's grid of its scan
        self._voxels: tuple[str, np.ndarray] | None = None  # the last scan the check read (`_checked_voxels`)
        self._whole_masks: set[tuple[str, int | None]] = set()  # (3D mask, label value) pairs checked
        for k, item in enumerate(self.items, start=1):
            try:
                self._check(item)
            except DataError as err:
                raise DataError(
                    f"predict item {k} ({item.class_name} in {item.image}, {as_given(item)}): {err}"
                ) from None
        self.case_ids = case_names([item.image for item in self.items])

    def check_view_counts(self, trained: int | None, asked: int | None) -> None:
        """Refuse a request with more slices (those with mask voxels) than the model was ``trained``
        with, or than ``data.views.count`` ``asked`` for when the config gives it: never a silent choice."""
        for k, refs in enumerate(self.slices, start=1):
            n, names = len(refs), "+".join(r.name for r in refs)
            if trained is not None and n > trained:
                raise DataError(
                    f"predict item {k} ({names}): {n} views asked (its slices with mask voxels) but the model "
                    f"was trained with at most {trained} view{'s' if trained > 1 else ''}: ask for {trained} "
                    f"or fewer, or train with data.views.count: {n}"
                )
            if asked is not None and n > asked:
                raise DataError(
                    f"predict item {k} ({names}) has {n} slices with mask voxels but data.views.count is {asked}: "
                    f"give data.views.count: {n} (at most what the model was trained with) or fewer slices"
                )

    def check_unique_outputs(self) -> None:
        """Refuse two requests that would write the same output files (same scan, structure and slice)."""
        stems: dict[str, int] = {}
        for k, stem in enumerate(self.stems, start=1):
            if stem in stems:
                raise DataError(
                    f"predict items {stems[stem]} and {k} ask for the same reconstruction ({stem}: same scan, "
                    "structure, slices and reading of the scan), so the second would overwrite the first's "
                    "files; remove one"
                )
            stems[stem] = k

    def reads_scan(self, i: int) -> bool:
        """Whether request ``i``'s sample carries the scan: its own ``context``, else the run's."""
        return (self.items[i].context or self.context) == "volume"

    @property
    def stems(self) -> list[str]:
        """Each request's output name (`output_stem`: ``<case>_<class>_<slices>``, ``_noscan`` when a
        model that reads the scan does not for it); unique within the request list."""
        return [
            output_stem(
                c,
                i.class_name,
                "+".join(r.name for r in refs),
                self.reads_scan(k) if self.scan_readable else None,
            )
            for k, (c, i, refs) in enumerate(zip(self.case_ids, self.items, self.slices, strict=True))
        ]

    @classmethod
    def from_settings(
        cls,
        items: Sequence[PredictItem | Mapping[str, Any]],
        data: DataContract | Mapping[str, Any],
        extent_mm: Mapping[str, float] | None = None,
        intensity_check: Literal["warn", "error"] = "warn",
        context: Context | None = None,
        all_pieces: bool = False,
        beyond_scan: bool = False,
        scans: dict[str, dict[str, Any]] | None = None,
        frame_from: FrameFrom = "auto",
    ) -> PredictionDataset:
        """The requests read as a model was trained to read scans: ``data`` is the `DataContract` a
        checkpoint or adapter folder stores (or its dict); ``extent_mm`` overrides stored extents;
        ``context``: whether the samples carry the scan (items may say otherwise), None as the model
        was trained; ``all_pieces``, ``beyond_scan``: what the outputs keep (`RequestNotes`); ``scans``:
        a dict kept across datasets on one scan and one model (a `Session`'s); ``frame_from``: "auto"
        sizes a request of several slices by its drawing, "class" every request by its class."""
        c = data if isinstance(data, DataContract) else DataContract.from_dict(data)
        extents = {**c.extent_mm, **(extent_mm or {})}
        cells = 4 * (c.resolution or c.slice_size // 4)
        source = c.context if context is None else context
        log.info(
            "requests read %s (%s)",
            "with the scan around the slices" if source == "volume" else "from the slices alone",
            "as the model was trained" if context is None else f"data.context.source: {context}",
        )
        return cls(
            items,
            c.prep,
            extents,
            c.frame_scale,
            c.slice_size,
            intensity_check,
            source,
            cells,
            c.context == "volume",
            c.tissue,
            c.context_reading,
            trained_classes=c.classes,
            all_pieces=all_pieces,
            beyond_scan=beyond_scan,
            scans=scans,
            frame_from=frame_from,
            tissue_model=c.context_tissue_model,
        )

    def _check_class(self, item: PredictItem) -> None:
        """A class with a frame extent; one the model was not trained on is named."""
        check_class_names([item.class_name], "class_name")
        if item.class_name not in self.extent_mm:
            raise DataError(
                f"class {item.class_name!r} has no frame extent; known: {sorted(self.extent_mm)} (give it "
                f"one: data.frame.extent_mm in a config, reconstruct(..., extent_mm={{{item.class_name!r}: mm}}) in Python; "
                "or use a checkpoint that stores its classes' extents)"
            )
        trained = self.trained_classes
        if trained is not None and item.class_name not in (*trained, ANY_STRUCTURE):
            warnings.warn(
                f"{item.class_name} in {item.image}: the model was not trained on {item.class_name} (it was "
                f"on {', '.join(trained)}): its shape is a guess from other structures, and the frame comes "
                f"from the extent given ({self.extent_mm[item.class_name]:g} mm; a request of several slices by its drawing)",
                stacklevel=4,
            )

    def _check(self, item: PredictItem) -> None:
        self._check_class(item)
        if not Path(item.image).is_file():
            raise DataError(f"image {item.image} does not exist")
        try:
            img = nib.load(item.image)
        except Exception as err:
            raise DataError(f"image {item.image} is not a readable NIfTI file: {err}") from err
        refs, masks = [], []
        for k, plane in enumerate(item.planes(), start=1):
            if not mask_exists(plane["mask"]):
                raise DataError(f"mask {plane['mask']} does not exist")
            # a 3D mask is checked whole (a label map without label_value, a value it lacks) before any slice
            if (plane["mask"], plane["label_value"]) not in self._whole_masks:
                read_mask_volume(Path(plane["mask"]), img, plane["label_value"])
                self._whole_masks.add((plane["mask"], plane["label_value"]))
            ref = locate_slice(img, parse_axis(plane["axis"]), plane["index"], plane["position_mm"])
            if any((r.file_axis, r.index) == (ref.file_axis, ref.index) for r in refs):
                raise DataError(
                    f"slice {k} ({ref.name}) is a plane given before: each slice must be another plane"
                )
            try:
                masks.append(read_slice_mask(Path(plane["mask"]), img, ref, plane["label_value"]))
            except DataError as err:
                if not item.slices or "has no voxels on" not in str(err):
                    raise
                warnings.warn(
                    f"{item.class_name} in {item.image}: slice {k} ({ref.name}) skipped: {err}", stacklevel=2
                )
                continue
            refs.append(ref)
        if not refs:
            raise DataError(f"no slice of {item.class_name} has mask voxels: nothing to reconstruct from")
        self._warn_apart(item, refs, masks)
        for a, b in contradicting_pairs(refs, masks):
            warnings.warn(
                f"{item.class_name} in {item.image}: the masks of slices {a + 1} ({refs[a].name}) and {b + 1} "
                f"({refs[b].name}) do not overlap on the line where their planes cross: is one of them wrong?",
                stacklevel=2,
            )
        grid = IsotropicGrid.of(*canonical_grid(img), self.prep.spacing_mm)
        refs = self._on_grid(refs, grid)
        self.grids.append(grid)
        # the slices as a set: one order whatever order they came in, so the frame and the names are too
        order = sorted(range(len(refs)), key=lambda j: refs[j].order)
        self.slices.append([refs[j] for j in order])
        self.masks.append([masks[j] for j in order])
        self.frames.append(
            request_frame(self.frame_from, refs, masks, img.affine, self.extent_mm[item.class_name])
        )
        if item.image not in self.scans:  # each scan read once here, so a bad one fails before any output
            self._check_intensities(item.image, img)

    @staticmethod
    def _warn_apart(item: PredictItem, refs: list[SliceRef], masks: list[np.ndarray]) -> None:
        """Neighbouring parallel slices whose masks share no pixel (`apart_pairs`) are named."""
        for a, b in apart_pairs(refs, masks):
            warnings.warn(
                f"{item.class_name} in {item.image}: the masks of the parallel slices {refs[a].name} and "
                f"{refs[b].name} share no pixel in-plane, so nothing joins them: is one drawn shifted, "
                "or on another structure?",
                stacklevel=3,
            )

    def _check_intensities(self, path: str, img: nib.Nifti1Image) -> None:
        """The scan's voxels are readable and finite; how it is read is logged (`read_modality`), with
        a warning (an error with ``intensity_check: error``) when its values doubt that reading."""
        try:
            values = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as err:
            raise DataError(f"image {path} cannot be read (truncated or corrupt?): {err}") from err
        bad = int((~np.isfinite(values)).sum())
        if bad:
            raise DataError(f"image {path} has {bad} NaN/inf voxels: intensities must be finite")
        self._voxels = (path, values)  # the request reading this scan next takes them (read once)
        reading = read_modality(self.prep, path, values)
        line = modality_line(path, reading)
        log.info(line)
        if reading.doubt and self.intensity_check == "error":
            raise DataError(f"{line} (data.predict.intensity_check: error refuses it; warn only warns)")
        self.scans[path] = {"reading": reading}  # checked: later requests on this scan skip it
        if reading.doubt:
            warnings.warn(line, stacklevel=3)

    def _on_grid(self, refs: list[SliceRef], grid: IsotropicGrid) -> list[SliceRef]:
        """The refs with the slice of the model's grid each one is read on; two on one grid slice
        would be one view read twice, so that is refused, naming both."""
        placed = [replace(r, grid_index=grid_slice(r, grid)) for r in refs]
        seen: dict[tuple[int, int], SliceRef] = {}
        for ref in placed:
            other = seen.setdefault((ref.axis, ref.grid_index), ref)
            if other is not ref:
                raise DataError(
                    f"slices {other.name} and {ref.name} land on one slice of the model's grid "
                    f"({self.prep.spacing_mm:g} mm spacing), so they would be one view read twice: give "
                    f"slices at least {self.prep.spacing_mm:g} mm apart, or one of them"
                )
        return placed

    def _checked_voxels(self, path: str) -> np.ndarray | None:
        """The voxels the intensity check read of ``path``, or None: the last scan checked is kept
        while requests on it are read (several structures or slices of one CT), then dropped."""
        if self._voxels is not None and self._voxels[0] == path:
            return self._voxels[1]
        self._voxels = None
        return None

    def __getstate__(self) -> dict[str, Any]:  # a loader worker's copy: not the scan read at check time
        return {**self.__dict__, "_voxels": None}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        item, refs = self.items[i], self.slices[i]
        raw = nib.load(item.image)
        try:
            sample = self._inputs(i, raw)
        except DataError as err:
            raise DataError(f"predict item {i + 1} (image {item.image}, mask {item.mask}): {err}") from err
        if item.truth:
            truth = read_mask_volume(Path(item.truth), raw, None)
        else:
            truth = read_mask_volume(Path(item.mask), raw, item.label_value) if item.scored else None
        frame_to_world = np.asarray(sample["frame_to_world"], dtype=np.float64)
        return sample | {
            "case_id": self.case_ids[i],
            "class_name": item.class_name,
            "source_image": str(item.image),
            "slice_name": "+".join(r.name for r in refs),
            "file_index": refs[0].index,
            # a 3D mask of the structure is its truth on the scan's grid: the prediction is scored against it
            "native": None if truth is None else native_from_mask(truth, raw.affine, frame_to_world),
            "scored_against": "request mask",
            "request": RequestNotes(
                self.scans[item.image]["reading"].modality,
                [(r.file_axis, r.index, m) for r, m in zip(refs, self.masks[i], strict=True)],
                self.all_pieces,
                self.beyond_scan,
                f"{self.frames[i][0]} ({self.frames[i][1]:.0f} mm)",
            ),
        }

    def _inputs(self, i: int, raw: nib.Nifti1Image) -> Sample:
        """Request ``i``'s model inputs: its slices resampled like a split's, in the frame they place."""
        item, refs = self.items[i], self.slices[i]
        classes, in_memory = self._view_labels(i, raw)
        labels = load_labels(item.image, classes, self.prep, in_memory)
        kept = self.scans.setdefault(item.image, {})
        if "image" not in kept:
            kept["image"] = load_image(item.image, self.prep, voxels=self._checked_voxels(item.image))
        volume = Volume(kept["image"], labels.labels, labels.affine, self.prep.spacing_mm)
        indices = [r.grid_index for r in refs]
        side_mm = frame_side_mm(*self.frames[i], self.frame_scale, len(refs))
        others = [(r.axis, index) for r, index in zip(refs[1:], indices[1:], strict=True)]
        centre = (
            seen_centre(volume.labels, list(range(1, len(refs))), others, refs[0].axis, indices[0])
            if others
            else None
        )
        first, _ = slice_frame(
            volume.labels, 0, volume.affine, volume.spacing_mm, refs[0].axis, indices[0], side_mm
        )
        frame = recentred(first, refs[0].axis, centre)
        planes = [(r.axis, index, k) for k, (r, index) in enumerate(zip(refs, indices, strict=True))]
        sample = slice_sample(volume.image, volume.labels, frame, planes, self.slice_size, self.max_views)
        inside = views_inside(sample, frame, volume.image.shape)
        names, where = [r.name for r in refs], self._where(i)
        trained = self.tissue.get(item.class_name)
        tissue = check_marked_tissue(
            where,
            "+".join(names),
            sample,
            side_mm,
            inside,
            trained,
            self.reading,
            self.intensity_check,
        )
        if self.reads_scan(i):
            context = sample_context(frame, volume.image, self.context_cells, raw.affine, raw.shape)
            sample["context"] = torch.from_numpy(with_tissue_model(context, sample, self.tissue_model))
        if self.reading == "relative":
            relative_sample(sample, tissue, inside)
        warn_at_edge(where, names, item.class_name, sample, side_mm)
        return sample

    def _where(self, i: int) -> str:
        """How warnings name request ``i`` (closed by the caller's ``)``)."""
        item = self.items[i]
        return f"predict item {i + 1} ({item.class_name} in {item.image}"

    @property
    def max_views(self) -> int:
        """The most views any request has (`collate` pads each batch to its own most)."""
        return max((len(refs) for refs in self.slices), default=1)

    def _view_labels(
        self, i: int, raw: nib.Nifti1Image
    ) -> tuple[dict[int, tuple[Path, None]], dict[Path, nib.Nifti1Image]]:
        """Request ``i``'s slice masks as label volumes in the file's orientation, view k as class bit k,
        for `load_volume`. Each mask is repeated on the file slices around its model grid slice's plane
        (`file_slices_read`), so the nearest-neighbour resampling cannot miss it."""
        classes, images = {}, {}
        grid = self.grids[i]
        for k, (ref, mask) in enumerate(zip(self.slices[i], self.masks[i], strict=True)):
            labels = np.zeros(raw.shape, dtype=np.uint8)
            for j in file_slices_read(ref, raw, grid):
                take: list[Any] = [slice(None)] * 3
                take[ref.file_axis] = j
                labels[tuple(take)] = mask
            key = Path(f"<view {k + 1} of request {i + 1}>")
            classes[k], images[key] = (key, None), nib.Nifti1Image(labels, raw.affine)
        return classes, images
