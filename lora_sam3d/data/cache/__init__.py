"""Per-case cache of preprocessed volumes, so each NIfTI is decoded and resampled once.

Two kinds of folder, each written to a temporary folder and renamed into place (a crash never
leaves a half-written entry that looks complete), built in two passes (`build_cases`, then
`build_images`; `lora_sam3d.data.dataset.cache_dataset` runs both):

- ``<cache_dir>/<case_id>-<key>/``: one class list's labels (``labels.npy`` in the smallest type
  that holds the classes, `lora_sam3d.data.labels.label_dtype`, cropped to the classes' union box),
  per class ``sdf_<c>.npy`` (float16 signed distance in mm, negative inside, truncated, on a crop
  around the structure), per class ``native_<c>.npy`` (uint8 mask on the source scan's own voxels,
  reoriented to RAS but not resampled, cropped to the structure: what metrics score against) and
  ``meta.json`` (affine, spacing, full shape, the crops' origins, per-class voxel counts, bounding
  box, per-axis slice areas, the native grid's affine and shape, and its image's key). Only the
  image's header is read for it.
- ``<cache_dir>/images/<case_id>-<image key>-<box>/``: the part of the case's image (float16,
  normalised) that samples can read (`image_reach`: the classes' boxes grown by half their frame's
  side, which depends on the training split's extents, known once every labels entry is built),
  stored as the non-zero part of that box (every voxel outside reads 0, which the normalisation
  gives air). The image key is the image file and the preprocessing; any later class list or run
  whose reach lies inside an existing box reads that entry (`find_image`), others cut their own.

A key hashes the content of the source files, the preprocessing settings, the class list (labels
only) and the cache format version, so a changed file or setting rebuilds only the cases it
touches. Entries are never removed implicitly: several runs (other classes, other settings) share
one cache and read each other's entries; two runs building the same entry at once both succeed
(the first rename wins). ``lora-sam3d cache`` lists entries and removes stale or long-unused ones
on request (`cache_entries`, `remove_entry`). Arrays are plain ``.npy`` files read through memory
maps (`CroppedArray` pastes a crop into the full grid on reading): a training sample touches one
slice and one small SDF crop, not the whole volume.
"""

from lora_sam3d.data.cache.keys import (
    CACHE_VERSION,
    IMAGES,
    FileHashes,
    case_key,
    file_sha256,
    image_key,
    source_digests,
)
from lora_sam3d.data.cache.maintenance import STALE_BUILD_S, CacheEntry, cache_entries, remove_entry
from lora_sam3d.data.cache.runner import BuildInterrupted, check_failed
from lora_sam3d.data.cache.store import (
    IN_USE_S,
    IN_USE_STAMP_S,
    CachedCase,
    CroppedArray,
    build_case,
    build_cases,
    build_image,
    build_images,
    entry_path,
    find_image,
    image_reach,
    is_built,
    nonzero_box,
)

__all__ = [
    "CACHE_VERSION",
    "IMAGES",
    "IN_USE_S",
    "IN_USE_STAMP_S",
    "STALE_BUILD_S",
    "BuildInterrupted",
    "CacheEntry",
    "CachedCase",
    "CroppedArray",
    "FileHashes",
    "build_case",
    "build_cases",
    "build_image",
    "build_images",
    "cache_entries",
    "case_key",
    "check_failed",
    "entry_path",
    "file_sha256",
    "find_image",
    "image_key",
    "image_reach",
    "is_built",
    "nonzero_box",
    "remove_entry",
    "source_digests",
]
