"""The data settings as one small tree of dataclasses, declared once: `TSDataModule`, `TS_SAM3D_Dataset`
and the YAML ``data`` section share it.

`DataSettings` groups how scans are read (``preprocessing``: `Preprocessing`), the frame and its
targets (``frame``), the slices of a sample (``views``), the scan as context (``context``), which
slices are drawn (``sampling``) and how cases are found (``cases``). Values are checked on
construction, with the key named (``data.frame.resolution``), so a bad setting fails before any file
is read or written. `DataContract` is what a trained model keeps of its data, in the same tree. The
flat keys of earlier versions (``data.spacing``, ``data.views: 3``) are mapped by `lora_sam3d.settings.old_keys`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from lora_sam3d.data.cases import Case, Layout, discover_cases
from lora_sam3d.data.nifti import DataError
from lora_sam3d.data.phantoms import PhantomSpec
from lora_sam3d.data.tissue_forest import TISSUE_MODELS
from lora_sam3d.data.volume import Preprocessing
from lora_sam3d.settings.tree import coerce

__all__ = [
    "CONTEXTS",
    "GROUPS",
    "MAX_VIEWS",
    "PREPROCESSING_SETTINGS",
    "SAMPLING_METHODS",
    "VIEW_LAYOUTS",
    "CaseSettings",
    "Context",
    "ContextSettings",
    "DataContract",
    "DataSettings",
    "FrameSettings",
    "SamplingMethod",
    "SamplingSettings",
    "ViewLayout",
    "ViewSettings",
]

ViewLayout = Literal["orthogonal", "parallel", "stack"]
VIEW_LAYOUTS: tuple[str, ...] = get_args(ViewLayout)

Context = Literal["volume", "none"]
FrameFrom = Literal["auto", "class"]
"""How a request's frame is sized: ``auto`` by its drawing when it has several slices, else by its
class's extent; ``class`` always by the class's extent (as validation and training frame)."""
CONTEXTS: tuple[str, ...] = get_args(Context)
Reading = Literal["absolute", "relative"]
READINGS: tuple[str, ...] = get_args(Reading)

SamplingMethod = Literal["random_axis", "uniform", "central", "all"]
SAMPLING_METHODS: tuple[str, ...] = get_args(SamplingMethod)

MAX_VIEWS = 32
"""The most slices one sample or request may have (``data.views.count``)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _count(value: Any) -> bool:
    return _is_int(value) and value >= 1


def _positive(value: Any) -> bool:
    return _is_number(value) and value > 0


def _fraction(value: Any) -> bool:
    return _is_number(value) and 0 <= value <= 1


def _check(group: Any, key: str, ok: bool, expected: str) -> None:
    if not ok:
        value = getattr(group, key)
        shown = list(value) if isinstance(value, tuple) else value
        raise DataError(f"data.{group.GROUP}.{key} must be {expected}, got {shown!r}")


def _one_of(choices: tuple[str, ...]) -> str:
    return f"{', '.join(choices[:-1])} or {choices[-1]}"


@dataclass(frozen=True)
class FrameSettings:
    """The cube a sample is cut in and its 3D targets.

    Args:
        resolution: the decoder's latent resolution R (the command links ``model.decoder``'s); targets
            are on the (4R+1)^3 vertex grid (SDF), the (4R)^3 cells (occupancy) and the R^3 cells
            (stage 1's occupancy).
        slice_size: pixels of the input slice (None: 4R).
        scale: frame side = ``scale * extent_mm`` (2 keeps the whole structure in the cube wherever
            the slice cuts it); > 0.
        extent_mm: per-class frame extent; missing classes get the training-split statistic.
        sdf_truncation_mm: SDF targets are clipped to +- this.
        coarse_target: stage 1's target on the R^3 cells: ``centre`` (the cell's centre is inside) or
            ``any`` (any of its fine cells is inside: TRELLIS's sparse structure, which keeps
            structures thinner than a cell, such as the myocardium's shell, in the active band; the
            shipped base is pretrained on it, and it is the default).
    """

    GROUP = "frame"
    resolution: int = 16
    slice_size: int | None = None
    scale: float = 2.0
    extent_mm: dict[str, float] | None = None
    sdf_truncation_mm: float = 10.0
    coarse_target: Literal["centre", "any"] = "any"

    def __post_init__(self) -> None:
        _check(self, "resolution", _count(self.resolution), "an integer >= 1")
        _check(self, "slice_size", self.slice_size is None or (_is_int(self.slice_size) and self.slice_size >= 8),
               "null or an integer >= 8")  # fmt: skip
        _check(self, "scale", _positive(self.scale), "a number > 0")
        _check(self, "sdf_truncation_mm", _positive(self.sdf_truncation_mm), "a positive number (mm)")
        _check(self, "coarse_target", self.coarse_target in ("centre", "any"), "centre or any")
        for name, mm in (self.extent_mm or {}).items():
            if not _positive(mm):
                raise DataError(f"data.frame.extent_mm[{name!r}] must be a positive number (mm), got {mm!r}")

    @property
    def pixels(self) -> int:
        """The input slice's side in pixels (``slice_size``, else 4R)."""
        return self.slice_size or 4 * self.resolution


@dataclass(frozen=True)
class ViewSettings:
    """The slices of one sample or request (`lora_sam3d.data.views`).

    Args:
        count: planes per sample: the count at validation, test and predict; while training, the
            most, each training sample drawing 1..count (view dropout), so one adapter serves 1 to
            ``count`` slices. Integer 1..32 (``orthogonal`` alone: <= 3; in a mix, orthogonal samples
            take at most 3). None: 1, and a request may have as many slices as the model was
            trained with (given, it caps them).
        layout: ``orthogonal`` (the planes normal to the other two axes through the first mask's
            centroid), ``parallel`` (slices along the first one's axis, alternating sides) or ``stack``
            (every slice ``spacing_mm`` apart along the first one's axis wherever the structure is, as
            a user who annotates every N-th slice; at most ``count``).
        layouts: while training, each sample draws its layout from this list (e.g. ``[orthogonal,
            stack]``), so one adapter serves one slice, orthogonal slices and a stack; None:
            ``layout`` alone. Validation, test and predict use ``layout``.
        spacing_mm: the distance between ``parallel`` or ``stack`` views, > 0.
    """

    GROUP = "views"
    count: int | None = None
    layout: ViewLayout = "orthogonal"
    layouts: tuple[ViewLayout, ...] | None = None
    spacing_mm: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.layouts, list | tuple):
            object.__setattr__(self, "layouts", tuple(self.layouts))
        fits = self.layout != "orthogonal" or (self.count or 1) <= 3 or bool(self.layouts)
        _check(self, "count", self.count is None or (_count(self.count) and self.count <= MAX_VIEWS and fits),
               f"null or an integer 1..{MAX_VIEWS} (at most 3 with views.layout: orthogonal alone)")  # fmt: skip
        _check(self, "layout", self.layout in VIEW_LAYOUTS, _one_of(VIEW_LAYOUTS))
        _check(self, "layouts", self.layouts is None or (bool(self.layouts) and set(self.layouts) <= set(VIEW_LAYOUTS)),
               f"null or a non-empty list of {', '.join(VIEW_LAYOUTS)}")  # fmt: skip
        _check(self, "spacing_mm", _positive(self.spacing_mm), "a positive number (mm)")

    @property
    def most(self) -> int:
        """Planes per sample (``count``; 1 when not given)."""
        return self.count or 1

    @property
    def drawn(self) -> tuple[str, ...]:
        """The layouts training samples draw from (``layouts``, else ``layout`` alone)."""
        return self.layouts or (self.layout,)


@dataclass(frozen=True)
class ContextSettings:
    """The scan around the slices.

    Args:
        source: ``volume``: each sample also carries the scan itself resampled into the frame
            (`lora_sam3d.data.frame.sample_context`), for a model that reads it
            (``model.context.read``); ``none``: the slices only; left out (null): as the model was
            trained when predicting with a trained model (its checkpoint or adapter says), else none.
        dropout: with ``source: volume``, the share of training samples whose context is blanked
            (read as "no scan"), so one adapter serves requests with and without it.
        reading: ``absolute``: the scan's normalised intensity (CT window, MR percentiles);
            ``relative``: each cell's intensity read against the tissue the sample's masks mark on
            its slices and the tissue around it (`lora_sam3d.data.tissue.relative_intensity`), so
            another contrast, protocol or modality gives the same evidence.
        tissue_model: ``forest``: the context gets a third channel, the probability that each cell
            is the drawn tissue from a random forest fitted on the sample's own drawn slices
            (`lora_sam3d.data.tissue_forest`), for a model that reads it (``model.context.tissue``);
            ``none``: no such channel.
    """

    GROUP = "context"
    source: Context | None = None
    dropout: float = 0.25
    reading: Reading = "absolute"
    tissue_model: str = "none"

    def __post_init__(self) -> None:
        _check(self, "source", self.source is None or self.source in CONTEXTS, " or ".join(CONTEXTS))
        _check(self, "dropout", _fraction(self.dropout), "a fraction in [0, 1]")
        _check(self, "reading", self.reading in READINGS, " or ".join(READINGS))
        _check(self, "tissue_model", self.tissue_model in TISSUE_MODELS, " or ".join(TISSUE_MODELS))


@dataclass(frozen=True)
class SamplingSettings:
    """Which slices make the samples.

    Args:
        train, eval: the method of the training split and of validation/test (see
            `TS_SAM3D_Dataset`: ``random_axis``, ``uniform``, ``central``, ``all``).
        axes: slice axes to use (0 sagittal, 1 coronal, 2 axial).
        min_occupancy: a slice is valid when its mask area is at least this fraction [0, 1] of the
            class's largest area along that axis (0: any slice the structure touches).
        samples_per_class: items per (case, class) for ``random_axis``.
        slices_per_axis: slices per axis for ``uniform``.
        augment: intensity augmentation of the training split's input slices.
    """

    GROUP = "sampling"
    train: SamplingMethod = "random_axis"
    eval: SamplingMethod = "uniform"
    axes: tuple[int, ...] = (0, 1, 2)
    min_occupancy: float = 0.2
    samples_per_class: int = 8
    slices_per_axis: int = 3
    augment: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes", tuple(int(a) for a in self.axes))
        for key in ("train", "eval"):
            _check(self, key, getattr(self, key) in SAMPLING_METHODS, _one_of(SAMPLING_METHODS))
        _check(self, "axes", bool(self.axes) and set(self.axes) <= {0, 1, 2} and len(set(self.axes)) == len(self.axes),
               "a non-empty subset of [0, 1, 2] (0 sagittal, 1 coronal, 2 axial) without repeats")  # fmt: skip
        _check(self, "min_occupancy", _fraction(self.min_occupancy), "a fraction in [0, 1]")
        _check(self, "samples_per_class", _count(self.samples_per_class), "an integer >= 1")
        _check(self, "slices_per_axis", _count(self.slices_per_axis), "an integer >= 1")


@dataclass(frozen=True)
class CaseSettings:
    """How cases are found (see `lora_sam3d.data.cases.discover_cases`): the folder ``layout``, the
    ``label_values`` of a label map, whether a case that cannot be read stops the run
    (``on_bad_case: error``) or is left out with a warning (``skip``), and the synthetic
    ``phantoms`` written into a data folder that holds no case yet (`PhantomSpec`; none: nothing)."""

    GROUP = "cases"
    layout: Layout = "auto"
    label_values: dict[str, int] | None = None
    on_bad_case: Literal["error", "skip"] = "error"
    phantoms: PhantomSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.phantoms, Mapping):
            object.__setattr__(self, "phantoms", PhantomSpec(**self.phantoms))
        _check(self, "on_bad_case", self.on_bad_case in ("error", "skip"), "error or skip")

    def find(self, root: str | Path, classes: Sequence[str], on_bad_case: str | None = None) -> list[Case]:
        """The cases of ``root`` with these settings (``on_bad_case`` given: that instead)."""
        return discover_cases(
            root, list(classes), self.layout, self.label_values, on_bad_case or self.on_bad_case
        )  # type: ignore[arg-type]


GROUPS: dict[str, type] = {
    "preprocessing": Preprocessing,
    "frame": FrameSettings,
    "views": ViewSettings,
    "context": ContextSettings,
    "sampling": SamplingSettings,
    "cases": CaseSettings,
}
"""The groups of `DataSettings`, by their key in the ``data`` section."""


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (YAML and JSON write lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return list(map(_plain, value)) if isinstance(value, tuple | list) else value


@dataclass(frozen=True)
class DataSettings:
    """The data settings: the groups (`GROUPS`), the seed of every random choice (splits, slice
    draws, augmentation) and the cache folder (default ``<root>/.cache``). Each group also takes a
    dict of its fields."""

    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    frame: FrameSettings = field(default_factory=FrameSettings)
    views: ViewSettings = field(default_factory=ViewSettings)
    context: ContextSettings = field(default_factory=ContextSettings)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    cases: CaseSettings = field(default_factory=CaseSettings)
    seed: int = 0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        for name, cls in GROUPS.items():
            object.__setattr__(self, name, coerce(cls, getattr(self, name), f"data.{name}"))

    def cache_path(self, root: str | Path) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(root) / ".cache"

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts (YAML, JSON and ``weights_only`` checkpoints read them)."""
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> DataSettings:
        """From nested dicts (`to_dict`, a data section); keys outside `DataSettings` are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in known})


PREPROCESSING_SETTINGS = (
    "spacing",
    "modality",
    "ct_window_hu",
    "frame_scale",
    "slice_size",
    "context_reading",
)
"""The `DataContract` keys that say how a model was trained to read scans: predicting uses the
stored values, and adapters routed in one run must agree on them (their places in the ``data``
section: `lora_sam3d.settings.old_keys.DATA_KEYS`)."""


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
        context_reading: how the scan is read, ``absolute`` or ``relative`` (`ContextSettings`).
        context_tissue_model: the context's per-sample tissue model, ``none`` or ``forest``.
        tissue: per class, what the structure looked like in the training scans (normalised
            intensity range inside it and of its contrast with its surroundings,
            `lora_sam3d.data.tissue.tissue_ranges`); None in models written before it existed.
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
    tissue: dict[str, list[float]] | None = None
    context_reading: str = "absolute"  # models written before the relative reading read absolute
    context_tissue_model: str = "none"

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
