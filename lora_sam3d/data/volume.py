"""Step 1 of the data flow: a NIfTI image and its labels -> a canonical, isotropic, normalised volume.

nibabel reads the files and gives the closest canonical (RAS) orientation; scipy.ndimage resamples
(linear for the image, nearest for labels). The affine is carried exactly through every step: the
resampled grid keeps the first voxel centre and the axis directions, only the spacing changes.
Labels of all requested classes are packed into one array (`lora_sam3d.data.labels`)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from scipy import ndimage

from lora_sam3d.data.labels import add_class, label_dtype, read_labels, structure_mask
from lora_sam3d.data.nifti import (
    Box,
    DataError,
    canonical_grid,
    check_same_grid,
    load_nifti,
    open_nifti,
    read_array,
)

__all__ = [
    "INTENSITY_SHARE",
    "IsotropicGrid",
    "LabelVolume",
    "ModalityReading",
    "Preprocessing",
    "Volume",
    "load_image",
    "load_labels",
    "load_volume",
    "modality_line",
    "normalise",
    "read_modality",
]


@dataclass
class Volume:
    """A preprocessed case.

    Attributes:
        image: (X, Y, Z) float32 normalised intensities, RAS-canonical voxel axes, isotropic.
        labels: (X, Y, Z) class labels as `label_dtype` codes them (read with `class_mask`).
        affine: (4, 4) float64 voxel index -> world RAS millimetres.
        spacing_mm: the isotropic voxel size.
        native_labels: (X', Y', Z') the same classes on the source scan's own voxels (reoriented
            to RAS only, not resampled): what the scan's ground truth is scored on.
        native_affine: (4, 4) voxel index -> world mm of ``native_labels``.
    """

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    spacing_mm: float
    native_labels: np.ndarray | None = None
    native_affine: np.ndarray | None = None


@dataclass(frozen=True)
class Preprocessing:
    """How volumes are prepared; part of the cache key.

    Args:
        spacing_mm: isotropic output voxel size.
        modality: ``ct`` clips to ``ct_window_hu`` then scales to [0, 1]; ``mr`` scales the
            ``mr_percentiles`` of each volume to [0, 1] and clips; ``auto`` reads each scan as its
            file says (`modality_of`): a data set of CT and MR cases, or requests of both.
        ct_window_hu: (low, high) Hounsfield window.
        mr_percentiles: (low, high) percentiles.
    """

    spacing_mm: float = 1.5
    modality: Literal["ct", "mr", "auto"] = "ct"
    ct_window_hu: tuple[float, float] = (-200.0, 400.0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        spacing = self.spacing_mm
        if not (isinstance(spacing, int | float) and not isinstance(spacing, bool) and spacing > 0):
            raise DataError(f"data.preprocessing.spacing_mm must be a positive number (mm), got {spacing!r}")
        if self.modality not in ("ct", "mr", "auto"):
            raise DataError(f"data.preprocessing.modality must be ct, mr or auto, got {self.modality!r}")
        try:
            low, high = (float(v) for v in self.ct_window_hu)
        except (TypeError, ValueError):
            low, high = 0.0, 0.0
        if not low < high:
            raise DataError(
                f"data.preprocessing.ct_window_hu must be [low, high] with low < high (HU), got {list(self.ct_window_hu)!r}"
            )
        object.__setattr__(self, "ct_window_hu", (low, high))  # one cache key for [-200, 400] and floats
        object.__setattr__(self, "mr_percentiles", tuple(float(v) for v in self.mr_percentiles))

    def modality_of(self, path: str | Path, image: np.ndarray) -> Literal["ct", "mr"]:
        """How the scan ``path`` is read (`read_modality`'s choice)."""
        return read_modality(self, path, image, doubt=False).modality


AIR_HU = -500.0
"""Air and lung in Hounsfield units lie at or below this; no MR magnitude, nor a z-scored MR, does."""

AIR_SHARE = 0.01
"""With ``modality: auto``, a scan with at least this share of air voxels (`AIR_HU`) is read as CT."""

INTENSITY_SHARE = 0.5
"""A scan with more than this share of its voxels above the CT window's top, read as CT, is
probably not in Hounsfield units (`read_modality`)."""

HU_SPAN = 100.0
"""A CT in Hounsfield units spans hundreds of HU between its 0.5th and 99.5th percentiles (fat,
water, bone); a scan spanning less is in other units (0..1-normalised, z-scored)."""


@dataclass(frozen=True)
class ModalityReading:
    """How one scan is read and why: ``modality`` (``ct`` or ``mr``), ``rule`` (what chose it: the
    setting, the file name or the values), ``why`` (that rule in words, for the log) and ``doubt``
    (why that may be wrong: the values contradict the file name or the setting, or the rule was
    close; None when nothing does)."""

    modality: Literal["ct", "mr"]
    rule: Literal["setting", "name", "values"]
    why: str
    doubt: str | None = None


def read_modality(
    prep: Preprocessing, path: str | Path, image: np.ndarray, doubt: bool = True
) -> ModalityReading:
    """The modality ``prep`` reads ``path`` as. ``modality: ct`` or ``mr`` is obeyed; ``auto`` takes
    TotalSegmentator's file names (``ct.nii.gz`` / ``mri.nii.gz``: a name beginning ``ct``, or ``mr``,
    ``t1``, ``t2``), else the values: CT when at least `AIR_SHARE` of the voxels lie at or below
    `AIR_HU`. Values that contradict the choice, or a share of air near the threshold, are the doubt
    (looked for unless ``doubt`` is False)."""
    name = Path(path).name
    by_name = {"mr": "mr", "t1": "mr", "t2": "mr", "ct": "ct"}.get(name.lower()[:2])
    rule = "setting" if prep.modality != "auto" else "name" if by_name else "values"
    # shares and percentiles from every 7th voxel: exact to a few in 10^4 on a scan, 7x cheaper on 80M voxels
    values = np.ravel(image, order="K")[::7]  # in memory order: a view of a Fortran-ordered NIfTI array
    air = float((values <= AIR_HU).mean()) if doubt or rule == "values" else 0.0
    if rule == "setting":
        modality, why = prep.modality, f"data.preprocessing.modality: {prep.modality}"
    elif rule == "name":
        modality, why = by_name, f"modality: auto, by its file name {name}"
    else:
        modality = "ct" if air >= AIR_SHARE else "mr"
        why = f"modality: auto, by its values: {air:.2%} of voxels at or below {AIR_HU:g} HU, CT from {AIR_SHARE:.0%}"
    reading = ModalityReading(modality, rule, why)  # type: ignore[arg-type]
    return replace(reading, doubt=_doubt(prep, values, reading, air)) if doubt else reading


def _doubt(prep: Preprocessing, image: np.ndarray, reading: ModalityReading, air: float) -> str | None:
    """Why ``reading`` of ``image`` (a sample of a scan's voxels) may be wrong (`read_modality`), or None."""
    auto, named, modality = prep.modality == "auto", reading.rule == "name", reading.modality
    if modality == "ct":
        share = float((image > prep.ct_window_hu[1]).mean())
        if share > INTENSITY_SHARE:
            return (
                f"{share:.0%} of its voxels lie above the CT window's top ({prep.ct_window_hu[1]:g} HU) and "
                f"read as white: is this an MR or a rescaled image?"
            )
        low, high = (float(v) for v in np.percentile(image, [0.5, 99.5]))
        if high - low < HU_SPAN:
            return (
                f"its values span {low:.3g}..{high:.3g} (0.5th..99.5th percentile), not the hundreds of "
                "Hounsfield units of a CT: is it normalised (0..1, z-scored) or an MR?"
            )
        if auto and named and air == 0.0:
            return f"its file name says CT but no voxel lies at or below {AIR_HU:g} HU (air): is it an MR?"
        if auto and not named and air < 4 * AIR_SHARE:
            return (
                f"only {air:.2%} of its voxels are air, close to the {AIR_SHARE:.0%} the rule reads CT from"
            )
        return None
    if air >= AIR_SHARE:
        return (
            f"{air:.0%} of its voxels lie at or below {AIR_HU:g}, as air in Hounsfield units: is this a CT?"
        )
    if auto and (negative := float((image < 0).mean())) >= 0.1:
        return f"{negative:.0%} of its voxels are negative (a z-scored MR?)"
    if auto and not named and air >= AIR_SHARE / 4:
        return f"{air:.2%} of its voxels are air, close to the {AIR_SHARE:.0%} the rule reads CT from"
    return None


def modality_line(path: str | Path, reading: ModalityReading) -> str:
    """The log's line for one scan: what it was read as, why, and the doubt if any."""
    line = f"image {path}: read as {reading.modality.upper()} ({reading.why})"
    if reading.doubt:
        line += f"; {reading.doubt}"
        if reading.rule != "setting":
            line += " If so, give data.preprocessing.modality: ct or mr"
    return line


def normalise(image: np.ndarray, prep: Preprocessing, path: Path) -> np.ndarray:
    if not np.isfinite(image).all():
        bad = int((~np.isfinite(image)).sum())
        raise DataError(f"image {path} has {bad} NaN/inf voxels: expected finite intensities")
    if (
        read_modality(prep, path, image).modality == "ct"
    ):  # float32 arithmetic, in place: a real CT is 80M voxels
        low, high = (float(v) for v in prep.ct_window_hu)
        out = np.subtract(image, np.float32(low), dtype=np.float32)
        out /= np.float32(high - low)
        return np.clip(out, 0.0, 1.0, out=out)
    low, high = np.percentile(image, prep.mr_percentiles)
    high = max(high, low + 1e-6)
    return np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class IsotropicGrid:
    """The canonical grid resampled to an isotropic spacing on the same axes: new voxel j sits at old
    voxel ``j * scale`` on each axis (voxel 0 centres coincide), so the new affine is the old one with
    its columns scaled. ``scale`` is None when the old grid already has the spacing (no resampling)."""

    shape: tuple[int, ...]
    affine: np.ndarray
    scale: np.ndarray | None

    @classmethod
    def of(cls, shape: tuple[int, ...], affine: np.ndarray, spacing_mm: float) -> IsotropicGrid:
        scale = spacing_mm / np.linalg.norm(affine[:3, :3], axis=0)
        new_affine = np.array(affine, dtype=np.float64)
        new_affine[:3, :3] = new_affine[:3, :3] * scale[None, :]
        if np.allclose(scale, 1.0):
            return cls(tuple(shape), new_affine, None)
        new_shape = tuple(max(1, math.floor((n - 1) / s) + 1) for n, s in zip(shape, scale, strict=True))
        return cls(new_shape, new_affine, scale)

    def resample_image(self, image: np.ndarray, box: Box | None = None) -> np.ndarray:
        """Linear resampling of the voxels of ``box`` ((low, high) corners on this grid, high
        exclusive; all of it by default): each output voxel depends only on its own position, so a
        box is the same voxels as the box of the whole."""
        lo, hi = box if box is not None else ([0] * 3, list(self.shape))
        if self.scale is None:
            return image[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        return ndimage.affine_transform(
            image,
            self.scale,
            offset=np.asarray(lo) * self.scale,
            output_shape=tuple(np.subtract(hi, lo)),
            order=1,
            mode="nearest",
        ).astype(np.float32)

    def resample_labels(self, labels: np.ndarray) -> np.ndarray:
        """Nearest voxel by index on each axis (what ndimage's order-0 resampling picks, but exact for
        every integer type: ndimage computes in float64, which cannot hold all 64 bits)."""
        if self.scale is None:
            return labels
        nearest = [
            np.clip(np.floor(np.arange(m) * s + 0.5).astype(np.int64), 0, n - 1)
            for m, s, n in zip(self.shape, self.scale, labels.shape, strict=True)
        ]
        return labels[np.ix_(*nearest)]


@dataclass
class LabelVolume:
    """A case's labels, preprocessed (`Volume` without the image)."""

    labels: np.ndarray
    affine: np.ndarray
    spacing_mm: float
    native_labels: np.ndarray
    native_affine: np.ndarray


def load_labels(
    image_path: str | Path,
    class_masks: dict[int, tuple[Path, int | None]],
    prep: Preprocessing,
    in_memory: Mapping[Path, nib.Nifti1Image] | None = None,
    class_names: Mapping[int, str] | None = None,
) -> LabelVolume:
    """The labels of one case on its canonical isotropic grid (see `load_volume`); of the image only
    the header is read (its grid)."""
    image_path = Path(image_path)
    image_img = open_nifti(image_path, "image")
    grid = canonical_grid(image_img)
    shape, affine = grid
    labels = np.zeros(shape, dtype=label_dtype(max(class_masks, default=0) + 1))
    names = {
        c: f"{(class_names or {}).get(c, f'class {c}')} ({path}{'' if value is None else f', value {value}'})"
        for c, (path, value) in class_masks.items()
    }
    loaded: dict[Path, np.ndarray] = {}

    def ours(path: Path) -> bool:
        return in_memory is not None and path in in_memory

    uses = Counter(label_path for label_path, _ in class_masks.values())
    for bit, (label_path, value) in class_masks.items():
        if label_path not in loaded:
            label_img = (
                nib.as_closest_canonical(in_memory[label_path])  # type: ignore[index]
                if ours(label_path)
                else load_nifti(label_path, "label")
            )
            check_same_grid(grid, label_img, image_path, label_path)
            # a request's own view masks are binary uint8 made here: no label checks over their voxels
            loaded[label_path] = (
                np.asarray(label_img.dataobj) if ours(label_path) else read_labels(label_img, label_path)
            )
        data = loaded[label_path]
        mask = (
            (data != 0)
            if ours(label_path)
            else structure_mask(data, value, label_path, "label", value_required=False)
        )
        add_class(labels, bit, mask, names)
        uses[label_path] -= 1
        if not uses[label_path]:  # one mask file in memory at a time (a label map: until its last class)
            del loaded[label_path]
    iso = IsotropicGrid.of(shape, affine, prep.spacing_mm)
    return LabelVolume(
        iso.resample_labels(labels), iso.affine, prep.spacing_mm, labels, np.asarray(affine, float)
    )


def load_image(
    image_path: str | Path, prep: Preprocessing, box: Box | None = None, voxels: np.ndarray | None = None
) -> np.ndarray:
    """One case's normalised image on its canonical isotropic grid (see `load_volume`), only the
    voxels of ``box`` ((low, high) corners on that grid) when given: a cache keeps the part samples
    read. The whole file is read (normalising MR needs its percentiles), unless ``voxels`` gives
    what a caller already read of it (float32, in the file's own orientation)."""
    image_path = Path(image_path)
    if voxels is None:
        image_img = load_nifti(image_path, "image")
        data = read_array(image_img, image_path, "image")
    else:
        image_img = nib.as_closest_canonical(nib.Nifti1Image(voxels, open_nifti(image_path, "image").affine))
        data = np.asarray(image_img.dataobj, dtype=np.float32)
    image = normalise(data, prep, image_path)
    return IsotropicGrid.of(image.shape, image_img.affine, prep.spacing_mm).resample_image(image, box)


def load_volume(
    image_path: str | Path,
    class_masks: dict[int, tuple[Path, int | None]],
    prep: Preprocessing,
    in_memory: Mapping[Path, nib.Nifti1Image] | None = None,
    class_names: Mapping[int, str] | None = None,
    voxels: np.ndarray | None = None,
) -> Volume:
    """Load, check, reorient, resample and normalise one case.

    ``class_masks`` maps bit c -> (label file, value): value None means "any non-zero voxel" (a
    binary mask file of the TotalSegmentator release), an int selects that value of an integer
    label map (the cropped layout). Files may repeat (one label map for several classes).
    ``in_memory`` gives label images (in their file orientation) to use instead of reading those
    paths (a 2D mask placed on its slice). ``class_names`` name the classes in errors. ``voxels``:
    the image's voxels when the caller has read them already (`load_image`).
    """
    labels = load_labels(image_path, class_masks, prep, in_memory, class_names)
    image = load_image(image_path, prep, voxels=voxels)
    return Volume(
        image, labels.labels, labels.affine, prep.spacing_mm, labels.native_labels, labels.native_affine
    )
