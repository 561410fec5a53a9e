"""Per-case cache of preprocessed volumes, so each NIfTI is decoded and resampled once.

One folder per case, ``<cache_dir>/<case_id>-<key>/``, written to a temporary folder and renamed
into place (a crash never leaves a half-written entry that looks complete). The key hashes the
content of the case's source files, the preprocessing settings, the class list and the cache
format version, so a changed file or setting rebuilds only the cases it touches. Entries are
never removed implicitly: several runs (other classes, other settings) share one cache and read
each other's entries; two runs building the same entry at once both succeed (the first rename
wins). ``lora-sam3d cache`` lists entries and removes stale or long-unused ones on request
(`cache_entries`, `remove_entry`). Arrays are plain ``.npy`` files read through memory
maps: a training sample touches one slice and one small SDF crop, not the whole volume.

Contents: ``image.npy`` (float16, normalised), ``labels.npy`` (uint32 class bits), per class
``sdf_<c>.npy`` (float16 signed distance in mm, negative inside, truncated, on a crop around
the structure), per class ``native_<c>.npy`` (uint8 mask on the source scan's own voxels,
reoriented to RAS but not resampled, cropped to the structure: what metrics score against) and
``meta.json`` (affine, spacing, per-class voxel counts, bounding box, per-axis slice areas, SDF
and native crop origins, the native grid's affine and shape).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from lora_sam3d.atomic import atomic_dir, atomic_write
from lora_sam3d.data.cases import Case
from lora_sam3d.data.volume import Preprocessing, load_volume

CACHE_VERSION = 2


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class FileHashes:
    """Content hashes of source files, remembered by (path, size, mtime) in ``<cache_dir>/file_hashes.json``.

    A large dataset is hashed once; later runs re-read only files whose size or time changed.
    """

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / "file_hashes.json"
        try:
            self.known: dict[str, list[Any]] = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.known = {}
        self.dirty = False

    def __call__(self, path: Path) -> str:
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        entry = self.known.get(str(path.resolve()))
        if entry and entry[:2] == stamp:
            return entry[2]
        digest = file_sha256(path)
        self.known[str(path.resolve())] = [*stamp, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        """Remember new hashes; on a read-only shared cache they are simply recomputed next time."""
        if self.dirty:
            text = json.dumps(self.known)
            with contextlib.suppress(PermissionError, OSError):
                atomic_write(self.path, lambda tmp: tmp.write_text(text))
            self.dirty = False


def case_key(
    case: Case, classes: list[str], prep: Preprocessing, sdf_truncation_mm: float, hashes: FileHashes
) -> str:
    payload = {
        "version": CACHE_VERSION,
        "preprocessing": asdict(prep),
        "classes": [[bit, classes[bit], case.class_masks[bit][1]] for bit in sorted(case.class_masks)],
        "sdf_truncation_mm": sdf_truncation_mm,
        "files": {p.relative_to(case.image.parent).as_posix(): hashes(p) for p in case.files},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def signed_distance_mm(mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Signed distance to the mask's boundary in mm (negative inside), exact Euclidean (scipy EDT).

    The boundary sits half a voxel outside the outermost mask voxel centres: a voxel next to the
    structure reads +spacing/2, the structure's border voxels -spacing/2.
    """
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing_mm)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing_mm)
    return np.where(mask, -(inside - 0.5 * spacing_mm), outside - 0.5 * spacing_mm)


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


def build_case(
    case: Case,
    classes: list[str],
    prep: Preprocessing,
    cache_dir: Path,
    sdf_truncation_mm: float = 10.0,
    hashes: FileHashes | None = None,
) -> Path:
    """Return the cache folder of ``case``, building it if missing or stale."""
    own = hashes is None
    hashes = hashes or FileHashes(cache_dir)
    key = case_key(case, classes, prep, sdf_truncation_mm, hashes)
    if own:
        hashes.save()
    final = cache_dir / f"{case.case_id}-{key}"
    if (final / "meta.json").is_file():
        _mark_used(final)
        return final
    volume = load_volume(case.image, case.class_masks, prep)

    def write(tmp: Path) -> None:
        np.save(tmp / "image.npy", volume.image.astype(np.float16))
        np.save(tmp / "labels.npy", volume.labels)
        per_class: dict[str, Any] = {}
        assert volume.native_labels is not None and volume.native_affine is not None
        for bit in sorted(case.class_masks):
            mask = (volume.labels >> np.uint32(bit)) & 1 == 1
            voxels = int(mask.sum())
            native = (volume.native_labels >> np.uint32(bit)) & 1 == 1
            info: dict[str, Any] = {
                "name": classes[bit],
                "voxels": voxels,
                "native_voxels": int(native.sum()),
            }
            if native.any():
                nz = np.nonzero(native)
                lo_n = [int(a.min()) for a in nz]
                hi_n = [int(a.max()) + 1 for a in nz]
                crop = native[lo_n[0] : hi_n[0], lo_n[1] : hi_n[1], lo_n[2] : hi_n[2]]
                np.save(tmp / f"native_{bit}.npy", crop.astype(np.uint8))
                info["native_origin"] = lo_n
            if voxels:
                nz = np.nonzero(mask)
                lo = [int(a.min()) for a in nz]
                hi = [int(a.max()) for a in nz]
                sdf, origin = _class_sdf(mask, prep.spacing_mm, sdf_truncation_mm)
                np.save(tmp / f"sdf_{bit}.npy", sdf)
                info |= {
                    "bbox_min": lo,
                    "bbox_max": hi,
                    "extent_mm": float((np.array(hi) - np.array(lo) + 1).max() * prep.spacing_mm),
                    "slice_areas": [
                        mask.sum(axis=tuple(a for a in range(3) if a != ax)).tolist() for ax in range(3)
                    ],
                    "sdf_origin": origin,
                }
            per_class[str(bit)] = info
        meta = {
            "version": CACHE_VERSION,
            "key": key,
            "case_id": case.case_id,
            "image": str(case.image),
            "sources": {str(p.resolve()): hashes(p) for p in case.files},
            "affine": volume.affine.tolist(),
            "spacing_mm": prep.spacing_mm,
            "shape": list(volume.image.shape),
            "native_affine": volume.native_affine.tolist(),
            "native_shape": list(volume.native_labels.shape),
            "sdf_truncation_mm": sdf_truncation_mm,
            "classes": per_class,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))

    return atomic_dir(final, write, exist_ok=True)  # a builder that finished first wins; both succeed


@dataclass
class CachedCase:
    """Read access to one cache folder; arrays are memory-mapped on first use."""

    path: Path
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
    def image(self) -> np.ndarray:
        return np.load(self.path / "image.npy", mmap_mode="r")

    @cached_property
    def labels(self) -> np.ndarray:
        return np.load(self.path / "labels.npy", mmap_mode="r")

    def class_info(self, bit: int) -> dict[str, Any]:
        return self.meta["classes"][str(bit)]

    def in_use(self) -> None:
        """Restamp the entry's last use while a run reads it (at most every `IN_USE_STAMP_S`), so a
        cleanup by ``--unused-days`` never takes an entry a running fit still reads."""
        now = time.time()
        if now - self.stamped >= IN_USE_STAMP_S:
            _mark_used(self.path)
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
        return {"path": self.path}


def cache_cases(
    cases: Iterable[Case], classes: list[str], prep: Preprocessing, cache_dir: Path, sdf_truncation_mm: float
) -> dict[str, CachedCase]:
    """Build (or find) the cache entry of every case once; case id -> its `CachedCase`."""
    hashes = FileHashes(cache_dir)
    built = {
        case.case_id: CachedCase(build_case(case, classes, prep, cache_dir, sdf_truncation_mm, hashes))
        for case in {c.case_id: c for c in cases}.values()
    }
    hashes.save()
    return built


@dataclass
class CacheEntry:
    """One cache folder as ``lora-sam3d cache`` reports it.

    ``stale`` says why the entry can no longer be used (an older cache format, a source file
    changed or gone, an interrupted build), or is None.
    """

    path: Path
    case_id: str
    classes: list[str]
    size_bytes: int
    last_used: float
    stale: str | None


STALE_BUILD_S = 24 * 3600.0
"""A temporary build folder older than this belongs to a build that was killed."""


def cache_entries(cache_dir: str | Path) -> list[CacheEntry]:
    """Every entry (and leftover temporary build folder) under ``cache_dir``, oldest use first."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise FileNotFoundError(f"cache folder {cache_dir} does not exist")
    hashes = FileHashes(cache_dir)
    out = []
    for path in sorted(p for p in cache_dir.iterdir() if p.is_dir()):
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if path.name.startswith("."):
            age = time.time() - path.stat().st_mtime
            why = "interrupted build" if age > STALE_BUILD_S else None  # else: a build in progress
            out.append(CacheEntry(path, path.name, [], size, path.stat().st_mtime, why))
            continue
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            out.append(CacheEntry(path, path.name, [], size, path.stat().st_mtime, "no readable meta.json"))
            continue
        classes = [info["name"] for info in meta.get("classes", {}).values()]
        stale = None
        if meta.get("version") != CACHE_VERSION:
            stale = f"cache format {meta.get('version')} (this version reads {CACHE_VERSION})"
        for source, digest in meta.get("sources", {}).items():
            if stale:
                break
            if not Path(source).is_file():
                stale = f"source {source} is gone"
            elif hashes(Path(source)) != digest:
                stale = f"source {source} changed"
        used = (path / "meta.json").stat().st_mtime
        out.append(CacheEntry(path, meta.get("case_id", path.name), classes, size, used, stale))
    hashes.save()
    return sorted(out, key=lambda e: e.last_used)


def remove_entry(entry: CacheEntry) -> None:
    """Remove one entry: renamed out of its key first, so no run can open it half-deleted.

    A run that already has its arrays open keeps reading them (POSIX keeps unlinked files alive).
    """
    doomed = entry.path.with_name(f".{entry.path.name}.removing")
    os.replace(entry.path, doomed)
    shutil.rmtree(doomed)
