"""Step 2 of the data flow: slice samples of cached cases, with their frame and 3D targets.

One sample = (case, class, axis, index). Deterministic for a seed whatever the number of
DataLoader workers: every random choice comes from a generator seeded by (seed, epoch, item).
The epoch travels inside the index (`EpochShuffleSampler`), so persistent workers and resumed
runs see the same draws as an uninterrupted run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from lora_sam3d.data.cache import CachedCase, build_cases, build_images, check_failed
from lora_sam3d.data.cases import SPLITS, Case, split_counts
from lora_sam3d.data.frame import (
    Frame,
    sample_context,
    sample_occupancy,
    sample_sdf,
)
from lora_sam3d.data.nifti import DataError
from lora_sam3d.data.sample import native_target, recentred, slice_frame, slice_sample
from lora_sam3d.data.settings import SAMPLING_METHODS, DataSettings, SamplingMethod
from lora_sam3d.data.tissue import drawn_views, marked_tissue, relative_sample, views_inside
from lora_sam3d.data.tissue_forest import with_tissue_model
from lora_sam3d.data.views import seen_centre, stack_planes, view_planes
from lora_sam3d.inputs import Sample

__all__ = [
    "EpochOffsetDistributedSampler",
    "EpochShuffleSampler",
    "ResumableSampler",
    "SamplingMethod",
    "TS_SAM3D_Dataset",
    "assign_splits",
    "cache_dataset",
    "class_extents_mm",
]


def assign_splits(
    cases: list[Case], seed: int = 0, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
) -> None:
    """Give every case without a split (no meta.csv entry) one, by a seeded shuffle of case ids."""
    todo = sorted(c.case_id for c in cases if c.split is None)
    if not todo:
        return
    order = np.random.default_rng(seed).permutation(len(todo))
    n_train, n_val, _ = split_counts(len(todo), fractions)
    by_id = {c.case_id: c for c in cases}
    for rank, i in enumerate(order):
        by_id[todo[i]].split = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"


def class_extents_mm(cached: Sequence[CachedCase], classes: Sequence[str]) -> dict[str, float]:
    """Per class, the largest bounding-box side (mm) over the given cases (use the training split)."""
    out: dict[str, float] = {}
    for bit, name in enumerate(classes):
        values = [c.class_info(bit).get("extent_mm", 0.0) for c in cached]
        values = [v for v in values if v > 0]
        if values:
            out[name] = float(max(values))
    return out


def cache_dataset(
    cases: Sequence[Case],
    classes: list[str],
    settings: DataSettings,
    cache_dir: Path,
    image_cases: Sequence[Case] | None = None,
    workers: int = 1,
    progress: bool = False,
) -> tuple[dict[str, CachedCase], dict[str, str], dict[str, float]]:
    """Cache a data set in two passes: every case's labels, then the per-class frame extents (the
    training split's statistic, `class_extents_mm`, or the settings'), then the image of each of
    ``image_cases`` (default: all) cut to what frames of those extents can read. Returns (case id ->
    `CachedCase` with its image, case id -> why it failed, class -> extent in mm)."""
    s, prep = settings, settings.preprocessing
    assign_splits(list(cases), s.seed)
    built, failed = build_cases(cases, classes, prep, cache_dir, s.frame.sdf_truncation_mm, workers, progress)
    wanted = [c for c in (cases if image_cases is None else image_cases) if c.case_id in built]
    train = [built[c.case_id] for c in cases if c.split == "train" and c.case_id in built]
    stats = class_extents_mm(train or [built[c.case_id] for c in wanted], classes)
    extents = {**stats, **(s.frame.extent_mm or {})}
    side_vox = {
        bit: s.frame.scale * extents[name] / prep.spacing_mm
        for bit, name in enumerate(classes)
        if name in extents
    }
    pairs = list({c.case_id: (c, built[c.case_id]) for c in wanted}.values())
    failed |= build_images(pairs, side_vox, prep, workers, progress)
    with_image = {c.case_id: cached for c, cached in pairs if c.case_id not in failed}
    return with_image, failed, extents


class ResumableSampler:
    """Skip the first items of one epoch once: where a run interrupted mid-epoch stopped."""

    epoch: int
    _resume: tuple[int, int] | None = None

    def resume(self, epoch: int, skip: int) -> None:
        """In ``epoch``, leave out the first ``skip`` items this process would have yielded."""
        self._resume = (epoch, skip)

    def _skipped(self, order: list[int]) -> list[int]:
        if self._resume is not None and self._resume[0] == self.epoch:
            order = order[self._resume[1] :]
            self._resume = None
        return order


class EpochShuffleSampler(ResumableSampler, Sampler[int]):
    """A shuffle that depends only on (seed, epoch); yields ``epoch * n + k`` so the dataset knows the epoch.

    Lightning calls ``set_epoch`` on samplers at each epoch start, also after resuming from a
    checkpoint, so a resumed run sees exactly the order (and random draws) of an uninterrupted one;
    from a mid-epoch checkpoint, `resume` makes it continue where the run stopped.
    """

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    @staticmethod
    def order(length: int, seed: int, epoch: int) -> list[int]:
        """The epoch's permutation of ``range(length)``, already offset by ``epoch * length``."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return (epoch * length + torch.randperm(length, generator=g)).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self._skipped(self.order(self.length, self.seed, self.epoch)))


class EpochOffsetDistributedSampler(ResumableSampler, DistributedSampler):
    """`DistributedSampler` over `EpochShuffleSampler`'s order: process ``r`` of ``w`` takes items
    ``r, r + w, ...`` of the one-process order (padded by wrapping around, as torch does), so with
    ``w`` processes of batch ``b`` each optimizer step sees the same samples as one process with batch
    ``w * b``, and random draws vary by epoch as they do on one process.

    Being a `DistributedSampler`, Lightning neither wraps nor replaces it and calls its
    ``set_epoch`` at every epoch start.
    """

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        order = EpochShuffleSampler.order(n, self.seed, self.epoch) if self.shuffle else list(range(n))
        if self.drop_last:
            order = order[: self.total_size]
        else:
            order += (order * math.ceil(self.total_size / max(n, 1)))[: self.total_size - n]
        return iter(self._skipped(order[self.rank : self.total_size : self.num_replicas]))


class TS_SAM3D_Dataset(Dataset):
    """Slice samples from TotalSegmentator-layout (or cropped-layout) NIfTI data.

    Args:
        root: data folder (see `lora_sam3d.data.cases`).
        classes: structure names; their order fixes the class indices.
        split: ``train``/``val``/``test`` or None for all cases. Splits come from ``meta.csv``,
            else from a seeded 70/15/15 shuffle of case ids (never by slice).
        slice_sampling_method: ``random_axis`` (each item a random axis and slice, for training),
            ``uniform`` (``slices_per_axis`` evenly spaced slices per axis), ``central`` (the slice
            through the mask's centroid, per axis), ``all`` (every valid slice).
        augment: intensity augmentation (contrast, brightness, noise) of the input slice.
        score_targets: add ``native`` (the scan's own mask around the frame) to each sample, for
            metrics; the data module turns it off for the training split.
        settings: the `DataSettings`, or give its fields as keywords (``frame={"resolution": 16},
            preprocessing={"spacing_mm": 1.5}``), not both.
    """

    def __init__(
        self,
        root: str | Path,
        classes: Sequence[str],
        split: str | None = None,
        slice_sampling_method: SamplingMethod = "random_axis",
        augment: bool = False,
        score_targets: bool = True,
        settings: DataSettings | None = None,
        **fields: Any,
    ) -> None:
        if settings is not None and fields:
            raise TypeError(
                f"TS_SAM3D_Dataset: pass DataSettings or its fields, not both (got {sorted(fields)})"
            )
        s = settings if settings is not None else DataSettings(**fields)
        if split is not None and split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS} or None, got {split!r}")
        if slice_sampling_method not in SAMPLING_METHODS:
            raise DataError(
                f"slice_sampling_method must be random_axis, uniform, central or all; got {slice_sampling_method!r}"
            )
        self.root = Path(root)
        self.classes = list(classes)
        self.split = split
        self.method = slice_sampling_method
        self.settings = s
        self.resolution = s.frame.resolution
        self.augment = augment
        self.seed = s.seed
        self.axes = s.sampling.axes
        self.slice_size = s.frame.pixels
        self.score_targets = score_targets
        self.prep = s.preprocessing
        self.cache_dir = s.cache_path(self.root)

        cases = s.cases.find(self.root, self.classes)
        assign_splits(cases, s.seed)
        wanted = [c for c in cases if split is None or c.split == split]
        if not wanted:
            raise DataError(f"no cases of split {split!r} in {self.root}")
        train = [c for c in cases if c.split == "train"]
        built, failed, self.extent_mm = cache_dataset(
            [*wanted, *train], self.classes, s, self.cache_dir, image_cases=wanted
        )
        check_failed(failed, len({c.case_id for c in [*wanted, *train]}), s.cases.on_bad_case)
        wanted = [c for c in wanted if c.case_id in built]
        if not wanted:
            raise DataError(f"no case of split {split!r} in {self.root} could be cached")
        self.cases = [built[c.case_id] for c in wanted]
        self.case_splits = {c.case_id: c.split for c in cases}
        missing = [c for c in self.classes if c not in self.extent_mm]
        if missing:
            raise DataError(
                f"classes {missing} have no voxels in any training case of {self.root} and no extent_mm in the config"
            )
        self.items = self._enumerate()
        if not self.items:
            raise DataError(f"no valid slices for classes {self.classes} in split {split!r} of {self.root}")
        self._check_stacks()

    # -- enumeration ------------------------------------------------------------------------------
    def _valid_indices(self, case: CachedCase, bit: int, axis: int) -> np.ndarray:
        areas = np.asarray(case.class_info(bit)["slice_areas"][axis])
        return np.flatnonzero(areas >= max(1.0, self.settings.sampling.min_occupancy * areas.max()))

    def _enumerate(self) -> list[tuple[int, int, int, int]]:
        """(case index, class bit, axis, slice index); axis/index -1 = drawn per item (random_axis)."""
        items = []
        empty = []
        for ci, case in enumerate(self.cases):
            for bit in range(len(self.classes)):
                info = case.class_info(bit)
                if info["voxels"] == 0:
                    lost = info.get("native_voxels", 0)
                    why = (
                        f" ({lost} voxels in the source, 0 after resampling to {case.spacing_mm} mm)"
                        if lost
                        else ""
                    )
                    empty.append(f"{case.case_id}/{self.classes[bit]}{why}")
                    continue
                if self.method == "random_axis":
                    items += [(ci, bit, -1, -1)] * self.settings.sampling.samples_per_class
                    continue
                for axis in self.axes:
                    valid = self._valid_indices(case, bit, axis)
                    if self.method == "all":
                        chosen = valid
                    elif self.method == "central":
                        areas = np.asarray(case.class_info(bit)["slice_areas"][axis], dtype=float)
                        centroid = (areas * np.arange(len(areas))).sum() / areas.sum()
                        chosen = valid[[np.abs(valid - centroid).argmin()]]
                    else:
                        pick = np.linspace(
                            0, len(valid) - 1, min(self.settings.sampling.slices_per_axis, len(valid))
                        )
                        chosen = valid[np.unique(np.round(pick).astype(int))]
                    items += [(ci, bit, axis, int(i)) for i in chosen]
        if empty:
            warnings.warn(
                f"{len(empty)} (case, class) pairs have no voxels and are left out: {empty[:10]}",
                stacklevel=3,
            )
        return items

    def __len__(self) -> int:
        return len(self.items)

    def _check_stacks(self) -> None:
        """A stack setting that leaves one slice of the structure for every sample is refused; for some
        samples, a warning counts them (they are scored from their one slice)."""
        v = self.settings.views
        if v.most <= 1 or v.layout != "stack" or self.method == "random_axis":
            return
        thin = []
        for ci, bit, axis, index in self.items:
            case = self.cases[ci]
            present = np.asarray(case.class_info(bit)["slice_areas"][axis]) > 0
            if not stack_planes(axis, index, v.most, v.spacing_mm / case.spacing_mm, present):
                thin.append(f"{case.case_id}/{self.classes[bit]} axis {axis}")
        why = (
            f"data.views.spacing_mm: {v.spacing_mm:g} mm apart, a stack keeps one slice of the structure for "
            f"{len(thin)} of {len(self.items)} samples of split {self.split!r} (e.g. {thin[:3]})"
        )
        if len(thin) == len(self.items):
            raise DataError(f"{why}: a stack needs at least two; give a smaller data.views.spacing_mm")
        if thin:
            warnings.warn(f"{why}; they are read from that one slice", stacklevel=3)

    # -- one sample -------------------------------------------------------------------------------
    def __getitem__(self, item: int) -> Sample:
        """Item ``k`` of epoch ``e`` may be asked as ``e * len(self) + k`` (see `EpochShuffleSampler`):
        random_axis draws and augmentation then vary by epoch, reproducibly."""
        epoch, local = divmod(int(item), len(self.items))
        ci, bit, axis, index = self.items[local]
        case = self.cases[ci]
        rng = np.random.default_rng([self.seed, epoch, local])
        if axis < 0:
            axis = int(rng.choice(self.axes))
            index = int(rng.choice(self._valid_indices(case, bit, axis)))
        return self.make_sample(case, bit, axis, index, rng)

    def _planes(
        self,
        case: CachedCase,
        bit: int,
        axis: int,
        index: int,
        first: Frame,
        rng: np.random.Generator | None,
    ) -> tuple[list[tuple[int, int]], float | None]:
        """The sample's view planes after the first, and the frame's centre along ``axis`` they give.

        The training split draws the layout (`ViewSettings.drawn`) and the count (view dropout:
        1..count; a stack 2..count); the other splits use ``views.layout`` and ``views.count``."""
        v = self.settings.views
        if v.most <= 1:
            return [], None
        training = self.split == "train" and rng is not None
        layout = v.layout
        if training and len(v.drawn) > 1:
            layout = str(rng.choice(list(v.drawn)))  # type: ignore[union-attr]
        most = min(v.most, 3) if layout == "orthogonal" else v.most
        count = int(rng.integers(2 if layout == "stack" else 1, most + 1)) if training else most  # type: ignore[union-attr]
        spacing_vox = v.spacing_mm / case.spacing_mm
        present = np.asarray(case.class_info(bit)["slice_areas"][axis]) > 0
        try:
            planes = view_planes(
                first,
                axis,
                index,
                case.image.shape,
                layout,
                count,
                spacing_vox,
                present,
            )
        except DataError as err:
            raise DataError(f"case {case.case_id}, {self.classes[bit]}: {err}") from None
        return planes, seen_centre(case.labels, [bit] * len(planes), planes, axis, index)

    def make_sample(
        self, case: CachedCase, bit: int, axis: int, index: int, rng: np.random.Generator | None = None
    ) -> Sample:
        name = self.classes[bit]
        s, n, r = self.settings, 4 * self.resolution, self.resolution
        side_mm = s.frame.scale * self.extent_mm[name]
        first, _ = slice_frame(case.labels, bit, case.affine, case.spacing_mm, axis, index, side_mm)
        planes, centre = self._planes(case, bit, axis, index, first, rng)
        frame = recentred(first, axis, centre)
        sample = slice_sample(
            case.image,
            case.labels,
            frame,
            [(axis, index, bit)] + [(a, i, bit) for a, i in planes],
            self.slice_size,
            s.views.most,
            rng if self.augment else None,
        )
        slice_name = "+".join(  # every view's plane, the sampled one first
            f"axis{a}_slice{i}"
            for a, i in zip(sample["view_axis"].tolist(), sample["view_index"].tolist(), strict=True)
        )
        if s.context.source == "volume":
            context = self._context(case, frame, rng)  # the tissue model learns from the drawn views
            sample["context"] = torch.from_numpy(with_tissue_model(context, sample, s.context.tissue_model))
        if s.context.reading == "relative":  # every intensity against the tissue its own slices mark
            images, masks = drawn_views(sample)
            inside = views_inside(sample, frame, case.image.shape)
            relative_sample(sample, marked_tissue(images, masks, side_mm / self.slice_size, inside), inside)
        crop, origin = case.sdf(bit)
        sample["gt_sdf"] = torch.from_numpy(
            sample_sdf(frame, crop, origin, n + 1, s.frame.sdf_truncation_mm, side_mm)
        )
        sample["gt_occupancy"] = torch.from_numpy(sample_occupancy(frame, crop, origin, n))
        if s.frame.coarse_target == "any":  # a cell is occupied when any of its 4^3 fine cells is
            sample["gt_coarse_occupancy"] = (
                sample["gt_occupancy"].reshape(r, 4, r, 4, r, 4).any(5).any(3).any(1)
            )
        else:
            sample["gt_coarse_occupancy"] = torch.from_numpy(sample_occupancy(frame, crop, origin, r))
        if self.score_targets:  # the scan's own mask, for metrics; training never reads it
            sample["native"] = native_target(case, bit, frame.frame_to_world)
        sample |= {
            "case_id": case.case_id,
            "class_name": name,
            "class_index": torch.tensor(bit),
            "source_image": case.meta["image"],
            "slice_name": slice_name,
        }
        return sample

    def _context(self, case: CachedCase, frame: Frame, rng: np.random.Generator | None) -> np.ndarray:
        """The scan around the sample (`sample_context` on the decoder's (4R)^3 cells); a training
        sample blanks it with probability ``context.dropout`` and scales its intensity as the slices'."""
        context = sample_context(
            frame, case.image, 4 * self.resolution, case.native_affine, case.native_shape
        )
        if self.split == "train" and rng is not None:
            if rng.uniform() < self.settings.context.dropout:
                context[:] = 0.0
            elif self.augment and self.settings.context.reading == "absolute":  # relative: invariant
                context[0] = np.clip(context[0] * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05), 0, 1)
                context[0] *= context[1]
        return context
