"""Cache keys: a hash of the source files' content, the preprocessing, the class list and the cache
format version, so a changed file or setting rebuilds only the cases it touches."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lora_sam3d.data.cases import Case
from lora_sam3d.data.volume import Preprocessing
from lora_sam3d.io.atomic import atomic_write

__all__ = [
    "CACHE_VERSION",
    "IMAGES",
    "FileHashes",
    "case_key",
    "file_sha256",
    "image_key",
    "source_digests",
]

CACHE_VERSION = 4
IMAGES = "images"
"""The sub-folder of the shared image entries."""


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


def _key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def source_digests(case: Case, hashes: FileHashes) -> dict[str, str]:
    """Resolved path -> content hash of each of the case's files (what a labels entry's key and
    staleness are judged by)."""
    return {str(p.resolve()): hashes(p) for p in case.files}


def case_key(
    case: Case, classes: list[str], prep: Preprocessing, sdf_truncation_mm: float, sources: Mapping[str, str]
) -> str:
    """The key of a case's labels entry for one class list (``sources``: `source_digests`)."""
    return _key(
        {
            "version": CACHE_VERSION,
            "preprocessing": asdict(prep),
            "classes": [[bit, classes[bit], case.class_masks[bit][1]] for bit in sorted(case.class_masks)],
            "sdf_truncation_mm": sdf_truncation_mm,
            "files": {
                p.relative_to(case.image.parent).as_posix(): sources[str(p.resolve())] for p in case.files
            },
        }
    )


def image_key(case: Case, prep: Preprocessing, sources: Mapping[str, str]) -> str:
    """The key of a case's image entries: the image file and the preprocessing only."""
    digest = sources[str(case.image.resolve())]
    return _key({"version": CACHE_VERSION, "preprocessing": asdict(prep), "image": digest})
