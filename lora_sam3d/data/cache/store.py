"""The cache's entries on disk: building a case's labels entry and its image entry (each written to a
temporary folder and renamed into place), finding an image entry that covers a box, and reading an
entry back through memory maps (`CachedCase`, `CroppedArray`)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from lora_sam3d.data.cache.keys import CACHE_VERSION, IMAGES, FileHashes, case_key, image_key, source_digests
from lora_sam3d.data.cache.runner import each_case
from lora_sam3d.data.cases import Case
from lora_sam3d.data.labels import class_mask
from lora_sam3d.data.nifti import Box
from lora_sam3d.data.volume import Preprocessing, load_image, load_labels
from lora_sam3d.geometry import signed_distance_mm
from lora_sam3d.io.atomic import atomic_dir

__all__ = [
    "IN_USE_S",
    "IN_USE_STAMP_S",
    "CachedCase",
    "CroppedArray",
    "build_case",
    "build_cases",
    "build_image",
    "build_images",
    "entry_path",
    "find_image",
    "image_reach",
    "is_built",
    "nonzero_box",
]


def nonzero_box(array: np.ndarray) -> Box:
    """(low, high) voxel corners of the box of ``array``'s non-zero voxels (high exclusive); one voxel
    at the origin when there are none, so every crop has a shape."""
    nz = [
        np.flatnonzero(array.any(axis=tuple(a for a in range(array.ndim) if a != ax)))
        for ax in range(array.ndim)
    ]
    if any(idx.size == 0 for idx in nz):
        return [0] * array.ndim, [1] * array.ndim
    return [int(idx[0]) for idx in nz], [int(idx[-1]) + 1 for idx in nz]


def _crop(array: np.ndarray, lo: list[int], hi: list[int]) -> np.ndarray:
    return array[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]


class CroppedArray:
    """A read view of an array of ``shape`` stored as ``crop`` at ``origin``; voxels outside the crop
    read 0. Indexing takes integers and step-1 slices (what reading a slice of a volume needs)."""

    def __init__(self, crop: np.ndarray, origin: list[int], shape: tuple[int, ...]) -> None:
        self.crop, self.origin, self.shape = crop, [int(o) for o in origin], tuple(int(n) for n in shape)
        self.dtype, self.ndim = crop.dtype, len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        out_shape, source, target, inside = [], [], [], True
        for k, o, c, n in zip(key, self.origin, self.crop.shape, self.shape, strict=True):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step != 1:
                    raise IndexError("CroppedArray reads step-1 slices only")
                out_shape.append(max(0, stop - start))
                lo, hi = max(start, o), min(stop, o + c)
                inside &= hi > lo
                source.append(slice(lo - o, max(lo, hi) - o))
                target.append(slice(lo - start, max(lo, hi) - start))
            else:
                i = int(k) + (n if int(k) < 0 else 0)
                if not 0 <= i < n:
                    raise IndexError(f"index {k} is out of bounds for an axis of size {n}")
                inside &= o <= i < o + c
                source.append(i - o)
        out = np.zeros(out_shape, self.dtype)
        if inside:
            out[tuple(target)] = self.crop[tuple(source)]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        full = self[(slice(None),) * self.ndim]
        return full if dtype is None else full.astype(dtype)


def _class_sdf(mask: np.ndarray, spacing_mm: float, truncation_mm: float) -> tuple[np.ndarray, list[int]]:
    """Truncated SDF on the structure's bounding box grown by the truncation; returns (crop, origin)."""
    nz = np.nonzero(mask)
    margin = int(np.ceil(truncation_mm / spacing_mm)) + 2
    lo = [max(0, int(a.min()) - margin) for a in nz]
    hi = [min(s, int(a.max()) + margin + 1) for a, s in zip(nz, mask.shape, strict=True)]
    crop = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    sdf = np.clip(signed_distance_mm(crop, spacing_mm), -truncation_mm, truncation_mm)
    return sdf.astype(np.float16), lo


IN_USE_STAMP_S = 60.0
"""A run reading an entry restamps its last use at least this often; cleanup keeps an entry used
within twice this (`IN_USE_S`): a run is reading it."""
IN_USE_S = 2 * IN_USE_STAMP_S


def _mark_used(entry: Path) -> None:
    """Stamp the entry's last use (its meta.json's time), which ``lora-sam3d cache`` reports and prunes by."""
    with contextlib.suppress(OSError):  # a read-only shared cache: the stamp is a courtesy, not a need
        os.utime(entry / "meta.json")


def entry_path(
    case: Case,
    classes: list[str],
    prep: Preprocessing,
    cache_dir: Path,
    sdf_truncation_mm: float,
    sources: Mapping[str, str],
) -> Path:
    """The folder of ``case``'s labels entry for ``classes``."""
    return cache_dir / f"{case.case_id}-{case_key(case, classes, prep, sdf_truncation_mm, sources)}"


def is_built(entry: Path) -> bool:
    return (entry / "meta.json").is_file()


def build_case(
    case: Case,
    classes: list[str],
    prep: Preprocessing,
    cache_dir: Path,
    sdf_truncation_mm: float = 10.0,
    sources: Mapping[str, str] | None = None,
) -> Path:
    """Return the cache folder of ``case``'s labels for ``classes``, building it if missing or stale
    (the image is cut later, once the frames' reach is known: `build_image`). ``sources``: the
    files' hashes (`source_digests`), computed here when not given."""
    if sources is None:
        hashes = FileHashes(cache_dir)
        sources = source_digests(case, hashes)
        hashes.save()
    final = entry_path(case, classes, prep, cache_dir, sdf_truncation_mm, sources)
    key = final.name.rsplit("-", 1)[1]
    image = f"{case.case_id}-{image_key(case, prep, sources)}"
    if is_built(final):
        _mark_used(final)
        return final
    volume = load_labels(case.image, case.class_masks, prep, class_names=dict(enumerate(classes)))

    def write(tmp: Path) -> None:
        lo, hi = nonzero_box(volume.labels)
        np.save(tmp / "labels.npy", _crop(volume.labels, lo, hi))
        per_class = {
            str(bit): _write_class(tmp, volume, bit, classes[bit], prep.spacing_mm, sdf_truncation_mm)
            for bit in sorted(case.class_masks)
        }
        meta = {
            "version": CACHE_VERSION,
            "key": key,
            "case_id": case.case_id,
            "image": str(case.image),
            "image_key": image,
            "sources": dict(sources),
            "affine": volume.affine.tolist(),
            "spacing_mm": prep.spacing_mm,
            "shape": list(volume.labels.shape),
            "labels_origin": lo,
            "native_affine": volume.native_affine.tolist(),
            "native_shape": list(volume.native_labels.shape),
            "sdf_truncation_mm": sdf_truncation_mm,
            "classes": per_class,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))

    atomic_dir(final, write, exist_ok=True)  # a builder that finished first wins; both succeed
    _mark_used(final)
    return final


def _write_class(
    tmp: Path, volume: Any, bit: int, name: str, spacing_mm: float, sdf_truncation_mm: float
) -> dict[str, Any]:
    """One class of a labels entry: its scan-grid mask crop and truncated SDF crop written to ``tmp``;
    returns what ``meta.json`` says of it (voxel counts, box, extent, per-slice areas, origins)."""
    mask = class_mask(volume.labels, bit)
    voxels = int(mask.sum())
    native = class_mask(volume.native_labels, bit)
    info: dict[str, Any] = {"name": name, "voxels": voxels, "native_voxels": int(native.sum())}
    if native.any():
        lo_n, hi_n = nonzero_box(native)
        np.save(tmp / f"native_{bit}.npy", _crop(native, lo_n, hi_n).astype(np.uint8))
        info["native_origin"] = lo_n
    if voxels:
        box_lo, box_hi = nonzero_box(mask)
        sdf, origin = _class_sdf(mask, spacing_mm, sdf_truncation_mm)
        np.save(tmp / f"sdf_{bit}.npy", sdf)
        info |= {
            "bbox_min": box_lo,
            "bbox_max": [h - 1 for h in box_hi],
            "extent_mm": float((np.array(box_hi) - np.array(box_lo)).max() * spacing_mm),
            "slice_areas": [mask.sum(axis=tuple(a for a in range(3) if a != ax)).tolist() for ax in range(3)],
            "sdf_origin": origin,
        }
    return info


def image_reach(meta: Mapping[str, Any], side_vox: Mapping[int, float]) -> Box:
    """The box of the image the samples of a labels entry (its ``meta``) can read, for frames of
    ``side_vox`` voxels per class bit: each class's bounding box grown by half its frame's side plus
    two voxels, the union over classes, within the grid. A frame's centre lies in its class's box (in
    plane, the slice mask's centroid; along the normal, the slice or the middle of what the views
    see), every view plane crosses the class, and a view reads its plane within half a side of the
    centre (and one voxel beyond, to interpolate)."""
    shape = meta["shape"]
    lo, hi = list(shape), [0] * len(shape)
    for bit, side in side_vox.items():
        info = meta["classes"][str(bit)]
        if not info["voxels"]:
            continue
        grow = math.ceil(side / 2) + 2
        lo = [min(a, max(0, b - grow)) for a, b in zip(lo, info["bbox_min"], strict=True)]
        hi = [max(a, min(n, b + 1 + grow)) for a, b, n in zip(hi, info["bbox_max"], shape, strict=True)]
    if any(a >= b for a, b in zip(lo, hi, strict=True)):
        return [0] * len(shape), [1] * len(shape)
    return lo, hi


def _contains(outer: Box, inner: Box) -> bool:
    return all(a <= b for a, b in zip(outer[0], inner[0], strict=True)) and all(
        a >= b for a, b in zip(outer[1], inner[1], strict=True)
    )


def find_image(cache_dir: Path, image: str, box: Box) -> Path | None:
    """The smallest built image entry of ``image`` (``<case>-<key>``) that holds ``box``, or None."""
    found = []
    for entry in (cache_dir / IMAGES).glob(f"{image}-*"):
        try:
            meta = json.loads((entry / "meta.json").read_text())
        except (OSError, ValueError):
            continue  # a build in progress or a broken entry
        held = (meta.get("box_min", []), meta.get("box_max", []))
        if meta.get("version") == CACHE_VERSION and _contains(held, box):  # type: ignore[arg-type]
            found.append((int(np.prod(np.subtract(held[1], held[0]))), entry.name, entry))
    return min(found)[2] if found else None


def build_image(case: Case, labels_entry: Path, box: Box, prep: Preprocessing) -> Path:
    """Cut an image entry of ``case`` holding exactly ``box`` from the image file (`build_images` first
    looks for one that holds it: `find_image`); the entry stores the box's non-zero part (every
    voxel outside reads 0, as air does after normalisation)."""
    meta = json.loads((labels_entry / "meta.json").read_text())
    cache_dir = labels_entry.parent
    name = "-".join(".".join(str(v) for v in corner) for corner in box)
    final = cache_dir / IMAGES / f"{meta['image_key']}-{name}"
    image = load_image(case.image, prep, box).astype(np.float16)
    lo, hi = nonzero_box(image)
    source = str(case.image.resolve())

    def write(tmp: Path) -> None:
        np.save(tmp / "image.npy", _crop(image, lo, hi))
        info = {
            "version": CACHE_VERSION,
            "case_id": case.case_id,
            "image": str(case.image),
            "sources": {source: meta["sources"][source]},
            "box_min": box[0],
            "box_max": box[1],
            "origin": [a + b for a, b in zip(box[0], lo, strict=True)],
            "shape": meta["shape"],
        }
        (tmp / "meta.json").write_text(json.dumps(info))

    atomic_dir(final, write, exist_ok=True)
    _mark_used(final)
    return final


@dataclass
class CachedCase:
    """Read access to one labels entry and the image entry it reads (``image_dir``, chosen for the
    frames' reach: `build_images`); arrays are memory-mapped on first use."""

    path: Path
    image_dir: Path | None = None
    stamped: float = field(default=0.0, repr=False, compare=False)  # when `in_use` last stamped the entry

    @cached_property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / "meta.json").read_text())

    @property
    def case_id(self) -> str:
        return self.meta["case_id"]

    @cached_property
    def affine(self) -> np.ndarray:
        return np.asarray(self.meta["affine"], dtype=np.float64)

    @property
    def spacing_mm(self) -> float:
        return float(self.meta["spacing_mm"])

    @cached_property
    def image(self) -> CroppedArray:
        """(X, Y, Z) float16 normalised image, read from its crop (0 outside)."""
        if self.image_dir is None:
            raise RuntimeError(f"case {self.case_id}: no image entry chosen (build_images picks one)")
        meta = json.loads((self.image_dir / "meta.json").read_text())
        return CroppedArray(
            np.load(self.image_dir / "image.npy", mmap_mode="r"), meta["origin"], meta["shape"]
        )

    @cached_property
    def labels(self) -> CroppedArray:
        """(X, Y, Z) class labels (`lora_sam3d.data.labels.class_mask` reads them), from their crop."""
        crop = np.load(self.path / "labels.npy", mmap_mode="r")
        return CroppedArray(crop, self.meta["labels_origin"], self.meta["shape"])

    def class_info(self, bit: int) -> dict[str, Any]:
        return self.meta["classes"][str(bit)]

    def in_use(self) -> None:
        """Restamp the entry's last use while a run reads it (at most every `IN_USE_STAMP_S`), so a
        cleanup by ``--unused-days`` never takes an entry a running fit still reads."""
        now = time.time()
        if now - self.stamped >= IN_USE_STAMP_S:
            _mark_used(self.path)
            if self.image_dir is not None:
                _mark_used(self.image_dir)
            self.stamped = now

    def sdf(self, bit: int) -> tuple[np.ndarray, np.ndarray]:
        """(crop, origin voxel) of the class's truncated SDF in mm (a sample is being built: `in_use`)."""
        self.in_use()
        crop = np.load(self.path / f"sdf_{bit}.npy", mmap_mode="r")
        return crop, np.asarray(self.class_info(bit)["sdf_origin"])

    def native(self, bit: int) -> tuple[np.ndarray, np.ndarray]:
        """(crop bool, origin voxel) of the class's mask on the source scan's own grid."""
        crop = np.load(self.path / f"native_{bit}.npy") > 0
        return crop, np.asarray(self.class_info(bit)["native_origin"])

    @cached_property
    def native_affine(self) -> np.ndarray:
        return np.asarray(self.meta["native_affine"], dtype=np.float64)

    @property
    def native_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["native_shape"])  # type: ignore[return-value]

    def __getstate__(self) -> dict[str, Any]:  # memory maps are reopened in each DataLoader worker
        return {"path": self.path, "image_dir": self.image_dir}


def build_cases(
    cases: Sequence[Case],
    classes: list[str],
    prep: Preprocessing,
    cache_dir: Path,
    sdf_truncation_mm: float,
    workers: int = 1,
    progress: bool = False,
) -> tuple[dict[str, CachedCase], dict[str, str]]:
    """Build (or find) the labels entry of every case (`build_case`, through `each_case`). Returns
    (case id -> `CachedCase` of the built ones, without an image yet, case id -> why it failed)."""
    hashes = FileHashes(cache_dir)
    unique = list({c.case_id: c for c in cases}.values())
    sources = {c.case_id: source_digests(c, hashes) for c in unique}  # hashed once, here
    hashes.save()
    paths = {
        c.case_id: entry_path(c, classes, prep, cache_dir, sdf_truncation_mm, sources[c.case_id])
        for c in unique
    }
    missing = [c for c in unique if not is_built(paths[c.case_id])]
    for c in unique:
        if c not in missing:
            _mark_used(paths[c.case_id])
    args = (classes, prep, cache_dir, sdf_truncation_mm)
    jobs = [(c, build_case, (*args, sources[c.case_id])) for c in missing]
    made, failed = each_case(jobs, f"caching {len(missing)} of {len(unique)} cases", workers, progress)
    built = {
        c.case_id: CachedCase(made.get(c.case_id, paths[c.case_id]))
        for c in unique
        if c.case_id not in failed
    }
    return built, failed


def build_images(
    cases: Sequence[tuple[Case, CachedCase]],
    side_vox: Mapping[int, float],
    prep: Preprocessing,
    workers: int = 1,
    progress: bool = False,
) -> dict[str, str]:
    """Give every (case, its labels entry) the image entry its samples read (`image_reach` for frames
    of ``side_vox`` voxels per class bit), building the missing ones (`build_image`, through
    `each_case`); returns case id -> why it failed (the image file cannot be read)."""
    jobs = []
    for case, cached in cases:
        box = image_reach(cached.meta, side_vox)
        found = find_image(cached.path.parent, cached.meta["image_key"], box)
        if found is None:
            jobs.append((case, build_image, (cached.path, box, prep)))
        else:
            _mark_used(found)
            cached.image_dir = found
    made, failed = each_case(jobs, f"cutting {len(jobs)} of {len(cases)} images", workers, progress)
    for case, cached in cases:
        if case.case_id in made:
            cached.image_dir = made[case.case_id]
    return failed
