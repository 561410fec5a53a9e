"""The typed seam between data and model: `Evidence`, `Targets` and `SampleInfo`, gathered in `Batch`.

A dataset item is one `Sample` (a typed dict, built by `lora_sam3d.data.dataset.slice_sample` for
training, validation and requests alike); `collate` turns a list of them into a `Batch`, the only thing that crosses from `lora_sam3d.data` to the model, the losses, the
scores and the writers. What the model may read is `Evidence` alone (the slices and the frame): the
3D truth lives in `Targets`, so it cannot leak into a forward pass by a misspelt key. Plain
dataclasses of tensors, moved with `Batch.to` (the data module's ``transfer_batch_to_device``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, TypedDict, TypeVar

import numpy as np
import torch

__all__ = [
    "CONTEXT_CHANNELS",
    "TISSUE_CHANNELS",
    "Batch",
    "Evidence",
    "RequestNotes",
    "Sample",
    "SampleInfo",
    "Targets",
    "collate",
]

CONTEXT_CHANNELS = 2
"""The scan as context: normalised intensity, and 1 where the cell lies inside the scan (0 outside)."""

TISSUE_CHANNELS = 1
"""What a context with a tissue model (``data.context.tissue_model: forest``) carries after its two:
the probability that each cell is the drawn tissue (`lora_sam3d.data.tissue_forest`)."""


def _pick(value: Any, idx: list[int]) -> Any:
    if value is None:
        return None
    return value[idx] if isinstance(value, torch.Tensor) else [value[i] for i in idx]


@dataclass
class RequestNotes:
    """What a request on a new scan carries beside its evidence, for its outputs.

    Attributes:
        modality: how its scan was read (``ct`` or ``mr``; `lora_sam3d.data.volume.read_modality`).
        drawing: each drawn slice on the scan's own grid: (file axis, file index, 2D bool mask), so
            the mask written there is the drawing itself.
        all_pieces: keep every piece of the prediction (default: only those touching the drawing).
        beyond_scan: keep the surface past the scan's field of view (default: cut and closed there).
        frame: where the frame's extent came from and the extent (``the drawing (74 mm)``).
    """

    modality: str | None = None
    drawing: list[tuple[int, int, np.ndarray]] | None = None
    all_pieces: bool = False
    beyond_scan: bool = False
    frame: str | None = None


class Sample(TypedDict, total=False):
    """One dataset item: K views (K varies by sample; `collate` pads), the frame, and what names and
    scores it. Every key is read by `collate`; the view keys are `Evidence`'s fields of one sample.

    Attributes:
        view_image, view_mask, view_distance: (K, S, S) float32 / bool / float32, as `Evidence`.
        view_axis, view_index: (K,) int64; view_offset: (K,) float32; view_valid: (K,) bool.
        frame_to_world: (4, 4) float64, frame coordinates -> world (RAS) mm.
        context: (2 or 3, n, n, n) float32 or None, the scan around the slices (absent: slices alone).
        gt_sdf, gt_occupancy, gt_coarse_occupancy: the 3D truth in the frame (training and scoring).
        native: the scan's own mask for scoring (`lora_sam3d.data.sample.native_box`) or None.
        scored_against: "truth" or "request mask"; case_id, class_name, source_image, slice_name:
            names; class_index: () int64; file_index: a request's first slice in its file.
        shown_image: (K, S, S) the views as a person sees them, when the model reads them relative.
        request: a request's `RequestNotes` (absent for a split's sample).
    """

    view_image: torch.Tensor
    view_mask: torch.Tensor
    view_distance: torch.Tensor
    view_axis: torch.Tensor
    view_index: torch.Tensor
    view_offset: torch.Tensor
    view_valid: torch.Tensor
    frame_to_world: torch.Tensor
    context: torch.Tensor | None
    gt_sdf: torch.Tensor
    gt_occupancy: torch.Tensor
    gt_coarse_occupancy: torch.Tensor
    native: dict[str, np.ndarray] | None
    scored_against: str
    case_id: str
    class_name: str
    class_index: torch.Tensor
    source_image: str | None
    slice_name: str
    file_index: int | None
    shown_image: torch.Tensor
    request: RequestNotes


R = TypeVar("R", bound="_Record")


class _Record:
    """What the three records share: moving their tensors and picking samples (fields of a dataclass)."""

    def to(self: R, device: torch.device | str) -> R:
        """A copy with every tensor field on ``device`` (other fields shared)."""
        fs = fields(self)  # type: ignore[arg-type]
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fs
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)  # type: ignore[type-var]

    def select(self: R, idx: list[int]) -> R:
        """The samples ``idx`` (a subset or permutation of the batch), in that order."""
        fs = fields(self)  # type: ignore[arg-type]
        return replace(self, **{f.name: _pick(getattr(self, f.name), idx) for f in fs})  # type: ignore[type-var]


@dataclass
class Evidence(_Record):
    """What the model reads: K views per sample (padded; ``valid`` marks the real ones) and the frame.

    Attributes:
        image: (B, K, S, S) float32, each view's intensity over the frame's cross-section at its plane.
        mask: (B, K, S, S) bool, the structure's mask on each view.
        distance: (B, K, S, S) float32, signed distance to the mask's border, frame units, < 0 inside.
        axis: (B, K) int64, each view's normal (voxel axis of the canonical grid: 0 sagittal, 1 coronal,
            2 axial).
        index: (B, K) int64, each view's slice on the canonical grid along ``axis``.
        offset: (B, K) float32, each view's plane along ``axis`` in frame units (0: the frame's centre).
        valid: (B, K) bool, which rows are views (the first always is).
        frame_to_world: (B, 4, 4) float64, frame coordinates [-0.5, 0.5]^3 -> world RAS mm.
        sample_ids: ``<case>__<class>__<axis>__<index>`` per sample (the first view), the name
            precomputed latents are stored under.
        context: (B, 2, C, C, C) float32, the scan itself on the frame's C^3 cells (intensity, and
            whether the cell lies inside the scan; `lora_sam3d.data.frame.sample_context`), or None
            (slices only). All zeros reads as "no scan".
    """

    image: torch.Tensor
    mask: torch.Tensor
    distance: torch.Tensor
    axis: torch.Tensor
    index: torch.Tensor
    offset: torch.Tensor
    valid: torch.Tensor
    frame_to_world: torch.Tensor
    sample_ids: list[str]
    context: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.image.shape[0]

    @property
    def device(self) -> torch.device:
        return self.image.device

    def permute_views(self, order: list[int]) -> Evidence:
        """The same evidence with the K views in another ``order`` (the model reads them as a set)."""
        views = ("image", "mask", "distance", "axis", "index", "offset", "valid")
        return replace(self, **{name: getattr(self, name)[:, order] for name in views})


@dataclass
class Targets(_Record):
    """What losses and scores compare with; never read by the model's forward pass.

    Attributes:
        sdf: (B, n+1, n+1, n+1) float32 truth SDF on the decoder's vertex grid (n = 4R), frame units.
        occupancy: (B, n, n, n) bool, the (4R)^3 cells inside the structure.
        coarse_occupancy: (B, R, R, R) bool, stage 1's target on the R^3 cells.
        native: per sample, the scan's own mask around the frame (``gt``, ``affine``, ``spacing_mm``;
            see `lora_sam3d.data.sample.native_box`) or None; None for a batch without any.
        scored_against: per sample, ``truth`` (a split's label) or ``request mask`` (a request's 3D mask).
    """

    sdf: torch.Tensor | None = None
    occupancy: torch.Tensor | None = None
    coarse_occupancy: torch.Tensor | None = None
    native: list[dict[str, Any] | None] | None = None
    scored_against: list[str] | None = None


@dataclass
class SampleInfo(_Record):
    """Which sample each row is: for names, routing, per-class metrics and writers.

    Attributes:
        case_id, class_name: the case and structure.
        class_index: (B,) int64, the class's index in the data's class list (None for requests).
        slice_name: every view's plane, the first one first (``axis2_slice44+axis0_slice30``,
            or a request's ``axial16+coronal69``).
        source_image: the NIfTI each sample was read from (its grid receives the predicted mask).
        file_index: a request's first slice in the file's own numbering (None for a split's sample).
        scan_read: per sample, whether it carries the scan as context (a request with ``context:
            none``, or a run with ``data.context.source: none``, does not).
        shown_image: per sample, its views' (K, S, S) intensities as the scan has them when the
            model reads them otherwise (``data.context.reading: relative``), for what people are
            shown (report, previews); None where the model reads the scan's own.
        request: per sample, a request's `RequestNotes`, or None (a split's sample).
    """

    case_id: list[str]
    class_name: list[str]
    slice_name: list[str]
    source_image: list[str | None]
    class_index: torch.Tensor | None = None
    file_index: list[int | None] | None = None
    scan_read: list[bool] | None = None
    shown_image: list[torch.Tensor | None] | None = None
    request: list[RequestNotes | None] | None = None


@dataclass
class Batch:
    """A collated batch: the model's `Evidence`, the `Targets` and the `SampleInfo`."""

    evidence: Evidence
    targets: Targets
    info: SampleInfo

    def __len__(self) -> int:
        return len(self.evidence)

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device`` (tensors moved; names and the scans' own masks stay where they are)."""
        return Batch(self.evidence.to(device), self.targets.to(device), self.info.to(device))

    def select(self, idx: list[int]) -> Batch:
        """The samples ``idx`` of the batch, in that order."""
        return Batch(self.evidence.select(idx), self.targets.select(idx), self.info.select(idx))


def _views(sample: Sample) -> dict[str, torch.Tensor]:
    """A sample's views as (K, ...) tensors, named as `Evidence`'s fields."""
    return {k.removeprefix("view_"): v for k, v in sample.items() if k.startswith("view_")}  # type: ignore[misc]


_PADDING = {
    "image": 0.0,
    "mask": False,
    "distance": 1.0,
    "axis": 0,
    "index": 0,
    "offset": 0.0,
    "valid": False,
}
"""What a padded (not valid) view row holds."""


def _stack_padded(rows: list[torch.Tensor], k: int, fill: float | bool | int) -> torch.Tensor:
    """(B, k, ...) from per-sample (K_i, ...) tensors, each padded to ``k`` rows with ``fill``."""
    out = torch.full((len(rows), k, *rows[0].shape[1:]), fill, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, : row.shape[0]] = row
    return out


def _optional_stack(samples: list[Sample], key: str) -> torch.Tensor | None:
    present = [key in s for s in samples]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(f"collate: some samples of the batch have {key!r} and others not")
    return torch.stack([s[key] for s in samples])


def _context(samples: list[Sample]) -> torch.Tensor | None:
    """The samples' context stacked; a sample without one (a request with ``context: none``) reads zeros."""
    given = [s.get("context") for s in samples]
    first = next((c for c in given if c is not None), None)
    if first is None:
        return None
    return torch.stack([torch.zeros_like(first) if c is None else c for c in given])


def collate(samples: list[Sample]) -> Batch:
    """A `Batch` from dataset items; samples of different view counts are padded to the most."""
    if not samples:
        raise ValueError("collate: an empty list of samples")
    views = [_views(s) for s in samples]
    k = max(v["valid"].shape[0] for v in views)
    stacked = {name: _stack_padded([v[name] for v in views], k, fill) for name, fill in _PADDING.items()}
    ids = [
        f"{s['case_id']}__{s['class_name']}__{int(v['axis'][0])}__{int(v['index'][0])}"
        for s, v in zip(samples, views, strict=True)
    ]
    evidence = Evidence(
        **stacked,
        frame_to_world=torch.stack([torch.as_tensor(s["frame_to_world"]) for s in samples]),
        sample_ids=ids,
        context=_context(samples),
    )
    has_native = any("native" in s for s in samples)
    targets = Targets(
        sdf=_optional_stack(samples, "gt_sdf"),
        occupancy=_optional_stack(samples, "gt_occupancy"),
        coarse_occupancy=_optional_stack(samples, "gt_coarse_occupancy"),
        native=[s.get("native") for s in samples] if has_native else None,
        scored_against=[s.get("scored_against", "truth") for s in samples],
    )
    info = SampleInfo(
        case_id=[s["case_id"] for s in samples],
        class_name=[s["class_name"] for s in samples],
        slice_name=[
            s.get("slice_name") or f"axis{int(v['axis'][0])}_slice{int(v['index'][0])}"
            for s, v in zip(samples, views, strict=True)
        ],
        source_image=[s.get("source_image") for s in samples],
        class_index=_optional_stack(samples, "class_index"),
        file_index=[s.get("file_index") for s in samples],
        scan_read=[s.get("context") is not None for s in samples],
        shown_image=[s.get("shown_image") for s in samples],
        request=[s.get("request") for s in samples],
    )
    return Batch(evidence, targets, info)
