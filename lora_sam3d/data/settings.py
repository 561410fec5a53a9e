"""`DataSettings`: the data settings that `TSDataModule` and `TS_SAM3D_Dataset` share, defined once.

Both take the same preprocessing, sampling and frame settings; keeping the fields, defaults and
checks here means the two cannot drift apart. Values are checked on construction, with the key
named, so a bad setting fails before any file is read or written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from lora_sam3d.data.cases import Layout
from lora_sam3d.data.volume import DataError, Preprocessing

__all__ = [
    "CONTEXTS",
    "MAX_VIEWS",
    "PREPROCESSING_SETTINGS",
    "VIEW_LAYOUTS",
    "Context",
    "DataContract",
    "DataSettings",
    "ViewLayout",
]

ViewLayout = Literal["orthogonal", "parallel", "stack"]
VIEW_LAYOUTS: tuple[str, ...] = get_args(ViewLayout)

Context = Literal["volume", "none"]
CONTEXTS: tuple[str, ...] = get_args(Context)

MAX_VIEWS = 32
"""The most slices one sample or request may have (`DataSettings.views`)."""

PREPROCESSING_SETTINGS = ("spacing", "modality", "ct_window_hu", "frame_scale", "slice_size")
"""How a model was trained to read scans: checkpoints and adapters store them, predicting uses the
stored values, and adapters routed in one run must agree on them."""


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
            dropout), so one adapter serves 1 to ``views`` slices. Integer 1..32 (``orthogonal``
            alone: <= 3; in a mix, orthogonal samples take at most 3).
        view_layout: ``orthogonal`` (the planes normal to the other two axes through the first
            mask's centroid), ``parallel`` (slices along the first one's axis, alternating sides) or
            ``stack`` (every slice ``view_spacing_mm`` apart along the first one's axis wherever the
            structure is, as a user who annotates every N-th slice; at most ``views``).
        view_layouts: while training, each sample draws its layout from this list (e.g.
            ``[orthogonal, stack]``), so one adapter serves one slice, orthogonal slices and a
            stack; None: ``view_layout`` alone. Validation, test and predict use ``view_layout``.
        view_spacing_mm: the distance between ``parallel`` or ``stack`` views, > 0.
        context: ``volume``: each sample also carries the scan itself resampled into the frame
            (`lora_sam3d.data.frame.sample_context`), for a model that reads it (``model.context``);
            ``none``: the slices only.
        context_dropout: with ``context: volume``, the share of training samples whose context is
            blanked (read as "no scan"), so one adapter serves requests with and without it.
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
    view_layout: ViewLayout = "orthogonal"
    view_spacing_mm: float = 10.0
    coarse_target: Literal["centre", "any"] = "any"
    view_layouts: tuple[str, ...] | None = None
    context: Context = "none"
    context_dropout: float = 0.25

    def __post_init__(self) -> None:
        self.axes = tuple(int(a) for a in self.axes)
        if isinstance(self.view_layouts, list | tuple):
            self.view_layouts = tuple(self.view_layouts)
        self.ct_window_hu = (float(self.ct_window_hu[0]), float(self.ct_window_hu[1]))
        for key, ok, expected in _CHECKS:
            if not ok(getattr(self, key)) or (key == "views" and not self._views_fit_layout()):
                raise DataError(f"data.{key} must be {expected}, got {_shown(getattr(self, key))!r}")
        for name, mm in (self.extent_mm or {}).items():
            if not (_is_number(mm) and mm > 0):
                raise DataError(f"data.extent_mm[{name!r}] must be a positive number (mm), got {mm!r}")
        self.prep  # noqa: B018 - checks modality and the CT window now

    def _views_fit_layout(self) -> bool:
        return self.view_layout != "orthogonal" or self.views <= 3 or bool(self.view_layouts)

    @property
    def layouts(self) -> tuple[str, ...]:
        """The layouts training samples draw from (`view_layouts`, else `view_layout` alone)."""
        return self.view_layouts or (self.view_layout,)

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


def _positive(value: Any) -> bool:
    return _is_number(value) and value > 0


def _count(value: Any) -> bool:
    return _is_int(value) and value >= 1


def _shown(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


_CHECKS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("resolution", _count, "an integer >= 1"),
    ("spacing", _positive, "a positive number (mm)"),
    ("min_occupancy", lambda v: _is_number(v) and 0 <= v <= 1, "a fraction in [0, 1]"),
    ("samples_per_class", _count, "an integer >= 1"),
    ("slices_per_axis", _count, "an integer >= 1"),
    ("slice_size", lambda v: v is None or (_is_int(v) and v >= 8), "null or an integer >= 8"),
    ("frame_scale", _positive, "a number > 0"),
    ("sdf_truncation_mm", _positive, "a positive number (mm)"),
    (
        "views",
        lambda v: _count(v) and v <= MAX_VIEWS,
        f"an integer 1..{MAX_VIEWS} (at most 3 with view_layout: orthogonal alone)",
    ),
    ("view_layout", lambda v: v in VIEW_LAYOUTS, f"{', '.join(VIEW_LAYOUTS[:-1])} or {VIEW_LAYOUTS[-1]}"),
    (
        "view_layouts",
        lambda v: v is None or (bool(v) and all(x in VIEW_LAYOUTS for x in v)),
        f"null or a non-empty list of {', '.join(VIEW_LAYOUTS)}",
    ),
    ("context", lambda v: v in CONTEXTS, " or ".join(CONTEXTS)),
    ("context_dropout", lambda v: _is_number(v) and 0 <= v <= 1, "a fraction in [0, 1]"),
    ("view_spacing_mm", _positive, "a positive number (mm)"),
    ("coarse_target", lambda v: v in ("centre", "any"), "centre or any"),
    (
        "axes",
        lambda v: bool(v) and set(v) <= {0, 1, 2} and len(set(v)) == len(v),
        "a non-empty subset of [0, 1, 2] (0 sagittal, 1 coronal, 2 axial) without repeats",
    ),
)
"""Each setting's check and what the error says it must be (checked in order)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


@dataclass
class DataContract:
    """What predicting on a new scan needs from the data a model was trained on.

    Checkpoints store it (their ``lora_sam3d.data`` section) and adapter folders too (``model.json``'s
    ``data``), as the plain dict `to_dict` gives, so a checkpoint or adapter alone predicts.

    Attributes:
        classes: the structures, in the training data's order.
        extent_mm: per class, the frame extent (a training-split statistic, or the config's).
        spacing, modality, ct_window_hu: how scans are read (`Preprocessing`).
        slice_size, frame_scale: the input slice's pixels and the frame's side per extent.
        resolution: the decoder's R the data was cut for.
        views, view_layout: the most views per sample it trained with, and their layout.
        view_layouts: the layouts training drew from (None: ``view_layout`` alone).
        context: ``volume`` when it trained with the scan as context (the model's ``context``
            says whether it can read it), ``none`` otherwise.
    """

    classes: list[str]
    extent_mm: dict[str, float]
    spacing: float
    modality: str
    ct_window_hu: list[float]
    slice_size: int
    frame_scale: float
    resolution: int | None = None
    views: int = 1  # files written before several views existed: one
    view_layout: str = "orthogonal"
    view_layouts: list[str] | None = None
    context: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataContract:
        """From a stored dict; keys of other versions are ignored, the newer ones take their defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def prep(self) -> Preprocessing:
        return Preprocessing(self.spacing, self.modality, tuple(self.ct_window_hu))  # type: ignore[arg-type]
