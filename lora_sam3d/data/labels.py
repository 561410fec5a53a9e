"""Label arrays: all requested classes packed into one array (`label_dtype`, `class_mask`): up to 64
classes as one bit per class in the smallest unsigned integer that holds them (uint8 for 8 classes,
uint64 for 64), so overlapping structures stay exact; past 64, as a label map (signed int8 up to
127 classes, int16 beyond; 0 = background, c + 1 = class c), which needs the classes disjoint (as
TotalSegmentator's are). Masks and label maps as users store them (float, integer values) are read
with one-line errors (`integer_labels`, `structure_mask`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np

from lora_sam3d.data.nifti import DataError, read_array

__all__ = [
    "LABEL_TOLERANCE",
    "MAX_CLASSES",
    "add_class",
    "class_mask",
    "integer_labels",
    "label_dtype",
    "label_values_present",
    "read_labels",
    "structure_mask",
]

MAX_CLASSES = 32767
"""The most classes a label map (int16) holds."""


def label_dtype(n_classes: int) -> np.dtype:
    """The array type holding ``n_classes`` classes: unsigned bits up to 64 classes (the smallest of
    uint8/16/32/64), a signed label map beyond (int8 up to 127 classes, else int16)."""
    if n_classes > MAX_CLASSES:
        raise DataError(
            f"{n_classes} classes given; at most {MAX_CLASSES} are supported (an int16 label map)"
        )
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if n_classes <= 8 * np.dtype(dtype).itemsize:
            return np.dtype(dtype)
    return np.dtype(np.int8 if n_classes <= 127 else np.int16)


def class_mask(labels: np.ndarray, c: int) -> np.ndarray:
    """Where class ``c`` is present in ``labels`` (any part of a `label_dtype` array): bit ``c`` of an
    unsigned array, value ``c + 1`` of a signed label map."""
    labels = np.asarray(labels)
    if labels.dtype.kind == "u":
        return (labels >> labels.dtype.type(c)) & 1 == 1
    return labels == c + 1


def add_class(labels: np.ndarray, c: int, mask: np.ndarray, names: Mapping[int, str]) -> None:
    """Mark class ``c`` where ``mask`` is true, in place. A label map cannot hold two classes in one
    voxel: an overlap is an error naming both classes (``names``) and the voxel count."""
    if labels.dtype.kind == "u":  # set the bit only where marked: no full-size temporaries (20x faster)
        bit = labels.dtype.type(1) << labels.dtype.type(c)
        np.bitwise_or(labels, bit, out=labels, where=np.asarray(mask, dtype=bool))
        return
    taken = mask & (labels != 0)
    if taken.any():
        other = int(np.bincount(labels[taken].astype(np.int64)).argmax()) - 1
        raise DataError(
            f"{names.get(other, other)} and {names.get(c, c)} overlap in {int(taken.sum())} voxels: past 64 "
            "classes the labels are stored as a label map, which needs the classes disjoint; train the "
            "overlapping ones in separate runs"
        )
    labels[mask] = c + 1


LABEL_TOLERANCE = 1e-3
"""A float label value within this of an integer is read as that integer (tools that write float masks)."""


def read_labels(img: nib.Nifti1Image, path: str | Path) -> np.ndarray:
    """Integer label values of a NIfTI label or mask file (see `integer_labels`)."""
    return integer_labels(read_array(img, path, "label", None), path)


def integer_labels(data: np.ndarray, path: str | Path, what: str = "label") -> np.ndarray:
    """Integer label values, as the field reads masks: binary or integer; float only when every value
    is within `LABEL_TOLERANCE` of an integer (then rounded). NaN/inf or fractional values are errors
    naming ``path``. Training labels and request masks both go through here. Integer data is returned
    as it is (a uint8 body CT mask stays 1 byte a voxel)."""
    data = np.asarray(data)
    if data.dtype.kind in "iub":
        return data
    data = data.astype(np.float64, copy=False)
    finite = np.isfinite(data)
    if not finite.all():
        raise DataError(
            f"{what} {path} has {int((~finite).sum())} NaN/inf voxels: a mask must hold integers (0 = background)"
        )
    rounded = np.rint(data)
    off = np.abs(data - rounded) > LABEL_TOLERANCE
    if off.any():
        found = np.unique(data[off])
        raise DataError(
            f"{what} {path} has {int(off.sum())} voxels that are not integers (e.g. {found[:5].tolist()}): "
            f"expected a binary or integer mask (float values are accepted within {LABEL_TOLERANCE} of an integer)"
        )
    return rounded.astype(np.int32)


def label_values_present(data: np.ndarray) -> list[int]:
    """The distinct non-zero values of an integer label array, ascending (a counting pass for the
    small non-negative types masks come in, a sort otherwise)."""
    data = np.asarray(data)
    if data.dtype == np.bool_:
        return [1] if data.any() else []
    if data.size and data.dtype.kind in "iu":
        low, high = int(data.min()), int(data.max())
        if low >= 0 and high <= 1:  # a binary mask, the common case: no count
            return [1] if high else []
        if low >= 0 and high < 1 << 16:
            flat, seen = data.reshape(-1), np.zeros(high + 1, dtype=bool)
            for start in range(0, flat.size, 1 << 22):  # in chunks: bincount copies to 8-byte integers
                seen |= np.bincount(flat[start : start + (1 << 22)], minlength=seen.size) > 0
            return [int(v) for v in np.flatnonzero(seen) if v]
    return [int(v) for v in np.unique(data) if v]


def structure_mask(
    data: np.ndarray, value: int | None, path: str | Path, what: str = "mask", value_required: bool = True
) -> np.ndarray:
    """Where one structure is in integer label data: the voxels equal to ``value``, or without a
    value the non-zero ones of a binary mask. A label map (several non-zero values) without a
    value is refused, naming the values: it would silently read the union of a TotalSegmentator-
    style map as one structure. A value the file does not hold is refused too, naming those it
    does (``value_required=False``: an empty mask, a training case without that structure)."""
    present = label_values_present(data)
    if value is None and len(present) > 1:
        shown = present if len(present) <= 12 else [*present[:12], "..."]
        raise DataError(
            f"{what} {path} holds {len(present)} label values {shown}: a label map, not one structure's "
            "mask; give the structure's value (label_value for a request, data.cases.label_values to "
            "train), or a mask with one non-zero value"
        )
    if value_required and value is not None and present and int(value) not in present:
        shown = present if len(present) <= 12 else [*present[:12], "..."]
        raise DataError(f"{what} {path} holds no voxel of label value {value}; values present: {shown}")
    return data != 0 if value is None else data == value
