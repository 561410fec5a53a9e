"""Finding cases on disk: TotalSegmentator's release layout and its cropped layout, plus `meta.csv` splits.

Release layout (v1 and v2)::

    <root>/meta.csv                          ';'-separated, maybe a UTF-8 BOM: image_id;...;split;...
    <root>/s0001/ct.nii.gz
    <root>/s0001/segmentations/<class>.nii.gz   one binary mask per class

Cropped layout (integer label maps; class values from the config)::

    <root>/s0001/s0001-image.nii.gz
    <root>/s0001/s0001-label.nii.gz
"""

from __future__ import annotations

import csv
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lora_sam3d.data.labels import MAX_CLASSES
from lora_sam3d.data.nifti import DataError

__all__ = [
    "SPLITS",
    "Case",
    "Layout",
    "check_class_names",
    "discover_cases",
    "read_meta_splits",
    "split_counts",
]

SPLITS = ("train", "val", "test")
Layout = Literal["auto", "totalsegmentator", "cropped"]


_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_class_names(classes: Sequence[str], where: str = "data.classes") -> None:
    """Class names become parts of file names (outputs, cache): letters, digits, ``_``, ``-``, ``.`` only;
    ``where`` says where the names came from (a config key, a request)."""
    bad = [c for c in classes if not isinstance(c, str) or not _SAFE_NAME.fullmatch(c)]
    if bad:
        raise DataError(
            f"{where}: class names {bad} are not safe file-name parts: use letters, digits, '_', '-' and '.' "
            "(not first), as TotalSegmentator's names do (e.g. heart_ventricle_left)"
        )


def split_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Train/val/test sizes for ``n`` cases; with 3 or more, every split gets at least one."""
    if n < 3:
        return n, 0, 0
    n_val = max(1, round(fractions[1] * n))
    n_test = max(1, round(fractions[2] * n))
    return n - n_val - n_test, n_val, n_test


@dataclass
class Case:
    """One scan: its image file and, per class bit, the label file and value to read."""

    case_id: str
    image: Path
    class_masks: dict[int, tuple[Path, int | None]] = field(default_factory=dict)
    split: str | None = None

    @property
    def files(self) -> list[Path]:
        return [self.image, *sorted({p for p, _ in self.class_masks.values()})]


def read_meta_splits(root: Path) -> dict[str, str]:
    """``image_id -> split`` from ``<root>/meta.csv`` ({} if absent).

    The delimiter (``;``, ``,`` or tab) is the one that splits the header into columns holding both
    ``image_id`` and ``split``; text columns may be quoted and hold the other delimiters. An id
    listed twice with different splits is an error (a training case must not slip into test).
    """
    path = root / "meta.csv"
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8-sig") as f:
        header = f.readline()
        f.seek(0)
        delimiter = None
        for candidate in (";", ",", "\t"):
            names = {h.strip() for h in next(csv.reader([header], delimiter=candidate), [])}
            if {"image_id", "split"} <= names:
                delimiter = candidate
                break
        if delimiter is None:
            raise DataError(
                f"{path} must have columns 'image_id' and 'split' (separated by ';', ',' or tab); "
                f"its header is {header.strip()[:200]!r}"
            )
        reader = csv.DictReader(f, delimiter=delimiter)
        splits: dict[str, str] = {}
        first_line: dict[str, int] = {}
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            image_id, split = row.get("image_id", ""), row.get("split", "")
            if not image_id and not split:
                continue  # a blank line
            if split not in SPLITS:
                raise DataError(
                    f"{path} line {line}: split {split!r} for {image_id!r}, expected one of {SPLITS}"
                )
            if image_id in splits and splits[image_id] != split:
                raise DataError(
                    f"{path}: image_id {image_id!r} is listed twice with different splits: "
                    f"{splits[image_id]!r} on line {first_line[image_id]}, {split!r} on line {line}"
                )
            splits[image_id] = split
            first_line.setdefault(image_id, line)
    return splits


TS_IMAGES = ("ct.nii.gz", "mri.nii.gz")
"""A TotalSegmentator-layout case's image: the CT dataset's ``ct.nii.gz``, or the MRI dataset's ``mri.nii.gz``."""


def _ts_image(case_dir: Path) -> Path:
    """The case's image: ``ct.nii.gz``, else ``mri.nii.gz``; a case holding both is refused (which one
    the labels belong to cannot be told)."""
    found = [case_dir / name for name in TS_IMAGES if (case_dir / name).is_file()]
    if len(found) > 1:
        raise DataError(
            f"case {case_dir.name} holds both ct.nii.gz and mri.nii.gz: keep one image per case folder"
        )
    return found[0] if found else case_dir / TS_IMAGES[0]


def _detect_layout(case_dir: Path) -> str | None:
    if any((case_dir / n).is_file() for n in TS_IMAGES) or (case_dir / "segmentations").is_dir():
        return "totalsegmentator"
    if (case_dir / f"{case_dir.name}-image.nii.gz").is_file():
        return "cropped"
    return None


def discover_cases(
    root: str | Path,
    classes: Sequence[str],
    layout: Layout = "auto",
    label_values: Mapping[str, int] | None = None,
    on_bad_case: Literal["error", "skip"] = "error",
) -> list[Case]:
    """All cases under ``root`` with the files for ``classes``, sorted by id, splits from meta.csv.

    Missing files raise `DataError` naming them, or (``on_bad_case='skip'``) skip the case with a
    warning.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a folder")
    if not classes:
        raise DataError("no classes given: name at least one structure (e.g. heart_ventricle_left)")
    if len(classes) > MAX_CLASSES:
        raise DataError(f"{len(classes)} classes given; at most {MAX_CLASSES} are supported")
    if len(set(classes)) != len(classes):
        raise DataError(f"classes has duplicates: {list(classes)}")
    check_class_names(classes)
    splits = read_meta_splits(root)
    cases, skipped = [], []
    for case_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        kind = layout if layout != "auto" else _detect_layout(case_dir)
        if kind is None:
            continue
        try:
            case = _case_from_dir(case_dir, kind, classes, label_values)
        except DataError as err:
            if on_bad_case == "error":
                raise
            warnings.warn(f"skipping case {case_dir.name}: {err}", stacklevel=2)
            skipped.append(case_dir.name)
            continue
        case.split = splits.get(case.case_id)
        cases.append(case)
    if not cases:
        raise DataError(
            f"no cases found in {root}: expected sXXXX/ct.nii.gz (or mri.nii.gz) with sXXXX/segmentations/<class>.nii.gz "
            f"(TotalSegmentator layout) or sXXXX/sXXXX-image.nii.gz with sXXXX-label.nii.gz (cropped layout)"
            + (f"; {len(skipped)} cases skipped as bad" if skipped else "")
        )
    return cases


def _case_from_dir(
    case_dir: Path, kind: str, classes: Sequence[str], label_values: Mapping[str, int] | None
) -> Case:
    cid = case_dir.name
    if kind == "totalsegmentator":
        image = _ts_image(case_dir)
        masks = {
            bit: (case_dir / "segmentations" / f"{name}.nii.gz", None) for bit, name in enumerate(classes)
        }
    elif kind == "cropped":
        if not label_values:
            raise DataError("the cropped layout needs label_values: a mapping class name -> integer label")
        unknown = [c for c in classes if c not in label_values]
        if unknown:
            raise DataError(f"classes {unknown} have no entry in label_values {dict(label_values)}")
        image = case_dir / f"{cid}-image.nii.gz"
        label = case_dir / f"{cid}-label.nii.gz"
        masks = {bit: (label, int(label_values[name])) for bit, name in enumerate(classes)}
    else:
        raise DataError(f"unknown layout {kind!r}: expected 'auto', 'totalsegmentator' or 'cropped'")
    missing = [str(p) for p in [image, *{p for p, _ in masks.values()}] if not p.is_file()]
    if missing:
        raise DataError(f"case {cid}: missing files {sorted(missing)}")
    return Case(cid, image, masks)
