"""What the tissue a user marked looks like in the scan: the intensities under the mask and around it.

A model reads scans in the units it was trained on (the CT window, or MR percentiles scaled to
0..1), or, with ``data.context.reading: relative``, relative to the tissue the user marked
(`relative_intensity`, `relative_sample`): each voxel's distance to the marked tissue against its
distance to the surroundings, which a change of contrast, protocol or modality leaves alone. `tissue_ranges` records, per class, the range over the training cases of the structure's
median intensity and of its contrast with a ring of surrounding tissue (`RING_MM` wide); it is
stored with the model (the data contract's ``tissue``). `marked_tissue` measures the same two on
a request's drawn slices, and `tissue_mismatch` says when they lie outside what the model saw:
inverted contrast, an MR read as CT, a 0..1-normalised image, a mask drawn on another scan.
Medians, so a few stray pixels do not move them. Plain numpy and scipy: no library computes
these statistics on a cache's crops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from lora_sam3d.data.frame import Frame, plane_axes, sample_slice

__all__ = [
    "MIN_SPREAD",
    "RING_MM",
    "TISSUE_MARGIN",
    "Tissue",
    "drawn_views",
    "inseparable",
    "marked_tissue",
    "read_relative",
    "relative_intensity",
    "relative_sample",
    "tissue_mismatch",
    "tissue_ranges",
    "views_inside",
]

RING_MM = 5.0
"""Width of the surroundings compared with the structure: the tissue just outside its border."""

TISSUE_MARGIN = 0.1
"""How far (normalised units, 0..1 over the window) outside the training range a request's marked
tissue may lie before it is named: the spread of a scanner's calibration and of contrast phases."""

MIN_PIXELS = 8
"""Fewer marked (or surrounding) pixels than this give no statistics."""


MIN_SPREAD = 0.02
"""The smallest spread (normalised units) a statistic is given: a constant region reads as neutral
evidence instead of dividing by zero."""


@dataclass(frozen=True)
class Tissue:
    """The marked tissue and the ring around it: medians and robust spreads (1.4826 x the median
    absolute deviation, at least `MIN_SPREAD`), in the model's normalised units."""

    inside: float
    inside_spread: float
    outside: float
    outside_spread: float

    @property
    def contrast(self) -> float:
        """Median inside minus median of the surroundings: > 0 where the structure is brighter."""
        return self.inside - self.outside


def _robust(values: np.ndarray) -> tuple[float, float]:
    median = float(np.median(values))
    return median, max(MIN_SPREAD, 1.4826 * float(np.median(np.abs(values - median))))


def _tissue(values_in: np.ndarray, values_ring: np.ndarray) -> Tissue | None:
    if values_in.size < MIN_PIXELS or values_ring.size < MIN_PIXELS:
        return None
    return Tissue(*_robust(values_in), *_robust(values_ring))


def relative_intensity(image: np.ndarray, tissue: Tissue | None) -> np.ndarray:
    """The scan read relative to what the user marked: per voxel, how much closer its intensity is to
    the marked tissue than to the tissue around it, in robust standard units, squashed to 0..1
    (0.5: as close to both, or no statistics; towards 1: like the marked tissue). Unchanged by a
    global change of contrast ``a I + b`` (either sign of ``a``), a protocol or a modality, as far as
    the scan's normalisation does not clip."""
    if tissue is None:
        return np.full(np.shape(image), 0.5, dtype=np.float32)
    image = np.asarray(image, dtype=np.float32)
    near_inside = np.abs(image - tissue.inside) / tissue.inside_spread
    near_outside = np.abs(image - tissue.outside) / tissue.outside_spread
    return (0.5 + 0.5 * np.tanh((near_outside - near_inside) / 4.0)).astype(np.float32)


def drawn_views(sample: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(images, masks) (K, S, S) of a sample's real views (its ``view_*`` rows that are valid)."""
    valid = np.asarray(sample["view_valid"], dtype=bool)
    return np.asarray(sample["view_image"])[valid], np.asarray(sample["view_mask"])[valid]


def relative_sample(sample: dict[str, Any], tissue: Tissue | None, inside: np.ndarray) -> None:
    """Read every intensity a sample carries relative to ``tissue``, in place: its views
    (``view_image``) and its context (`read_relative`), so the model sees no absolute unit
    anywhere. View pixels outside the scan (``inside``, `views_inside`) read neutral."""
    import torch

    # what a person is shown of the slices (report, previews) stays the scan itself
    sample["shown_image"] = torch.as_tensor(drawn_views(sample)[0]).clone()
    views = relative_intensity(np.asarray(sample["view_image"]), tissue)
    valid = np.asarray(sample["view_valid"], dtype=bool)
    rows = views[valid]
    rows[~inside] = 0.5
    views[valid], views[~valid] = rows, 0.0  # padding stays padding
    sample["view_image"] = torch.from_numpy(views)
    if sample.get("context") is not None:
        sample["context"] = torch.from_numpy(read_relative(np.asarray(sample["context"]), tissue))


def read_relative(context: np.ndarray, tissue: Tissue | None) -> np.ndarray:
    """A (2, n, n, n) context (`lora_sam3d.data.frame.sample_context`) with its intensity channel
    read relative to ``tissue`` (`relative_intensity`); outside the scan it stays 0 ("no scan")."""
    out = np.array(context, dtype=np.float32, copy=True)
    out[0] = relative_intensity(out[0], tissue) * out[1]
    return out


def case_tissue(image: Any, sdf_mm: np.ndarray, origin: Sequence[int]) -> Tissue | None:
    """One structure in one cached case: ``sdf_mm`` (its truncated signed distance crop, < 0 inside)
    at ``origin`` of the normalised ``image`` (an array or a cache's cropped view)."""
    region = tuple(slice(int(o), int(o) + n) for o, n in zip(origin, sdf_mm.shape, strict=True))
    values = np.asarray(image[region], dtype=np.float32)
    inside, ring = sdf_mm < 0, (sdf_mm >= 0) & (sdf_mm <= RING_MM)
    return _tissue(values[inside], values[ring])


def tissue_ranges(cases: Sequence[Any], classes: Sequence[str]) -> dict[str, list[float]]:
    """Per class, ``[inside_min, inside_max, contrast_min, contrast_max]`` over ``cases`` (cached
    cases of the training split: ``image`` and ``sdf(bit)``); classes without voxels are left out."""
    out: dict[str, list[float]] = {}
    for bit, name in enumerate(classes):
        found = []
        for case in cases:
            crop, origin = case.sdf(bit)
            if (np.asarray(crop) < 0).any():
                found.append(case_tissue(case.image, np.asarray(crop, dtype=np.float32), origin))
        found = [t for t in found if t is not None]
        if found:
            inside, contrast = [t.inside for t in found], [t.contrast for t in found]
            out[name] = [min(inside), max(inside), min(contrast), max(contrast)]
    return out


def marked_tissue(
    images: np.ndarray, masks: np.ndarray, pixel_mm: float, inside: np.ndarray | None = None
) -> Tissue | None:
    """The tissue under a sample's drawn masks: ``images``/``masks`` (K, S, S), the views as the
    model reads them (normalised intensity, the frame's pixels of ``pixel_mm``); ``inside`` (K, S, S)
    marks the pixels that lie in the scan (the frame may reach past its edge, where the views read
    0), the only ones counted. None when the masks are too small (or fill their views) for statistics."""
    masks = np.asarray(masks, dtype=bool)
    inside = np.ones(masks.shape, dtype=bool) if inside is None else np.asarray(inside, dtype=bool)
    steps = max(1, round(RING_MM / pixel_mm))
    ring = np.stack([ndimage.binary_dilation(m, iterations=steps) & ~m if m.any() else m for m in masks])
    images = np.asarray(images, dtype=np.float32)
    return _tissue(images[masks & inside], images[ring & inside])


def views_inside(sample: Mapping[str, Any], frame: Frame, shape: Sequence[int]) -> np.ndarray:
    """(K, S, S) bool: which pixels of each real view of ``sample`` lie inside the volume of
    ``shape`` (the canonical grid the views were cut from, in ``frame``)."""
    valid = np.asarray(sample["view_valid"], dtype=bool)
    size = np.asarray(sample["view_mask"]).shape[-1]
    out = []
    for axis in np.asarray(sample["view_axis"])[valid]:
        p, q = plane_axes(int(axis))
        ones = np.ones((shape[p], shape[q]), dtype=np.float32)
        out.append(sample_slice(frame, ones, int(axis), size, order=0) > 0.5)
    return np.stack(out)


def tissue_mismatch(tissue: Tissue, trained: Sequence[float]) -> str | None:
    """Why a request's marked ``tissue`` is unlike the class's training range (`tissue_ranges`'
    four numbers), or None."""
    lo, hi, c_lo, c_hi = trained
    if not lo - TISSUE_MARGIN <= tissue.inside <= hi + TISSUE_MARGIN:
        return (
            f"the marked tissue's median intensity is {tissue.inside:.2f} (normalised) where the training "
            f"cases had {lo:.2f}..{hi:.2f}"
        )
    if (c_lo > TISSUE_MARGIN / 2 and tissue.contrast < 0) or (
        c_hi < -TISSUE_MARGIN / 2 and tissue.contrast > 0
    ):
        side = "brighter" if c_lo > 0 else "darker"
        return (
            f"the marked tissue is {'darker' if side == 'brighter' else 'brighter'} than its surroundings "
            f"(contrast {tissue.contrast:+.2f}) where in every training case it was {side} "
            f"({c_lo:+.2f}..{c_hi:+.2f}): inverted contrast?"
        )
    return None


SEPARABLE = 0.25
"""With the relative reading, the marked tissue and its ring are told apart when their medians lie
at least this share of their larger spread apart (`inseparable`)."""


def inseparable(tissue: Tissue) -> str | None:
    """Why a relative reading cannot tell the marked tissue from its ring (`SEPARABLE`), or None."""
    spread = max(tissue.inside_spread, tissue.outside_spread)
    if abs(tissue.contrast) >= SEPARABLE * spread:
        return None
    return (
        f"the marked tissue reads like the tissue around it (medians {tissue.inside:.3f} and {tissue.outside:.3f}, "
        f"spread {spread:.3f}, normalised), so the scan cannot tell the structure from its surroundings"
    )
