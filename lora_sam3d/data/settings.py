"""`DataSettings`: the data settings that `TSDataModule` and `TS_SAM3D_Dataset` share, defined once.

Both take the same preprocessing, sampling and frame settings; keeping the fields, defaults and
checks here means the two cannot drift apart. Values are checked on construction, with the key
named, so a bad setting fails before any file is read or written.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from lora_sam3d.data.cases import Layout
from lora_sam3d.data.volume import DataError, Preprocessing


@dataclass
class DataSettings:
    """Preprocessing, sampling and frame settings of the data.

    Args:
        resolution: the decoder's latent resolution R; targets are on the (4R+1)^3 vertex grid
            (SDF), the (4R)^3 cells (occupancy) and the R^3 cells (stage 1's occupancy).
        spacing: isotropic voxel size in mm the volumes are resampled to.
        cache_dir: where preprocessed cases go (default ``<root>/.cache``).
        seed: base of every random choice (splits, slice draws, augmentation).
        axes: slice axes to use (0 sagittal, 1 coronal, 2 axial).
        min_occupancy: a slice is valid when its mask area is at least this fraction [0, 1] of the
            class's largest area along that axis (0: any slice the structure touches).
        samples_per_class: items per (case, class) for ``random_axis`` sampling.
        slices_per_axis: slices per axis for ``uniform`` sampling.
        slice_size: pixels of the input slice (default 4R).
        extent_mm: per-class frame extent; missing classes get the training-split statistic.
        frame_scale: frame side = ``frame_scale * extent_mm`` (2 keeps the whole structure in the
            cube wherever the slice cuts it); > 0.
        sdf_truncation_mm: SDF targets are clipped to +- this.
        layout, label_values, on_bad_case: how cases are found (see `discover_cases`).
        modality, ct_window_hu: intensity normalisation (see `Preprocessing`).
        views: planes per sample (`lora_sam3d.data.views`): the count at validation, test and
            predict; while training, the most, each training sample drawing 1..views (view
            dropout), so one adapter serves 1 to ``views`` slices. Integer >= 1 (``orthogonal``: <= 3).
        view_layout: ``orthogonal`` (the planes normal to the other two axes through the first
            mask's centroid) or ``parallel`` (slices along the first one's axis).
        view_spacing_mm: the distance between ``parallel`` views, > 0.
        coarse_target: stage 1's target on the R^3 cells: ``centre`` (the cell's centre is inside)
            or ``any`` (any of its fine cells is inside: TRELLIS's sparse structure, which keeps
            structures thinner than a cell, such as the myocardium's shell, in the active band; the
            shipped base is pretrained on it, and it is the default).
    """

    resolution: int = 16
    spacing: float = 1.5
    cache_dir: str | None = None
    seed: int = 0
    axes: tuple[int, ...] = (0, 1, 2)
    min_occupancy: float = 0.2
    samples_per_class: int = 8
    slices_per_axis: int = 3
    slice_size: int | None = None
    extent_mm: dict[str, float] | None = None
    frame_scale: float = 2.0
    sdf_truncation_mm: float = 10.0
    layout: Layout = "auto"
    label_values: dict[str, int] | None = None
    modality: Literal["ct", "mr"] = "ct"
    ct_window_hu: tuple[float, float] = (-200.0, 400.0)
    on_bad_case: Literal["error", "skip"] = "error"
    views: int = 1
    view_layout: Literal["orthogonal", "parallel"] = "orthogonal"
    view_spacing_mm: float = 10.0
    coarse_target: Literal["centre", "any"] = "any"

    def __post_init__(self) -> None:
        self.axes = tuple(int(a) for a in self.axes)
        self.ct_window_hu = (float(self.ct_window_hu[0]), float(self.ct_window_hu[1]))
        checks: list[tuple[str, Any, bool, str]] = [
            ("resolution", self.resolution, _is_int(self.resolution) and self.resolution >= 1, "an integer >= 1"),
            ("spacing", self.spacing, _is_number(self.spacing) and self.spacing > 0, "a positive number (mm)"),
            ("min_occupancy", self.min_occupancy,
             _is_number(self.min_occupancy) and 0 <= self.min_occupancy <= 1, "a fraction in [0, 1]"),
            ("samples_per_class", self.samples_per_class,
             _is_int(self.samples_per_class) and self.samples_per_class >= 1, "an integer >= 1"),
            ("slices_per_axis", self.slices_per_axis,
             _is_int(self.slices_per_axis) and self.slices_per_axis >= 1, "an integer >= 1"),
            ("slice_size", self.slice_size,
             self.slice_size is None or (_is_int(self.slice_size) and self.slice_size >= 8), "null or an integer >= 8"),
            ("frame_scale", self.frame_scale, _is_number(self.frame_scale) and self.frame_scale > 0, "a number > 0"),
            ("sdf_truncation_mm", self.sdf_truncation_mm,
             _is_number(self.sdf_truncation_mm) and self.sdf_truncation_mm > 0, "a positive number (mm)"),
            ("views", self.views, _is_int(self.views) and self.views >= 1
             and (self.view_layout != "orthogonal" or self.views <= 3),
             "an integer >= 1 (at most 3 with view_layout: orthogonal)"),
            ("view_layout", self.view_layout, self.view_layout in ("orthogonal", "parallel"), "orthogonal or parallel"),
            ("view_spacing_mm", self.view_spacing_mm,
             _is_number(self.view_spacing_mm) and self.view_spacing_mm > 0, "a positive number (mm)"),
            ("coarse_target", self.coarse_target, self.coarse_target in ("centre", "any"), "centre or any"),
            ("axes", list(self.axes),
             bool(self.axes) and set(self.axes) <= {0, 1, 2} and len(set(self.axes)) == len(self.axes),
             "a non-empty subset of [0, 1, 2] (0 sagittal, 1 coronal, 2 axial) without repeats"),
        ]  # fmt: skip
        for key, value, ok, expected in checks:
            if not ok:
                raise DataError(f"data.{key} must be {expected}, got {value!r}")
        for name, mm in (self.extent_mm or {}).items():
            if not (_is_number(mm) and mm > 0):
                raise DataError(f"data.extent_mm[{name!r}] must be a positive number (mm), got {mm!r}")
        self.prep  # noqa: B018 - checks modality and the CT window now

    @property
    def prep(self) -> Preprocessing:
        """The volume preprocessing these settings ask for (part of the cache key)."""
        return Preprocessing(spacing_mm=self.spacing, modality=self.modality, ct_window_hu=self.ct_window_hu)

    def cache_path(self, root: str | Path) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(root) / ".cache"

    @classmethod
    def pick(cls, values: dict[str, Any]) -> DataSettings:
        """The settings among ``values`` (e.g. a data module's hyper-parameters); other keys are ignored."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value
