"""What ``lora-sam3d cache`` lists and removes: every entry with its size, age and state
(`cache_entries`), and removal of one (`remove_entry`)."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from lora_sam3d.data.cache.keys import CACHE_VERSION, IMAGES, FileHashes

__all__ = [
    "STALE_BUILD_S",
    "CacheEntry",
    "cache_entries",
    "remove_entry",
]


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
    kind: str = "labels"  # or "image": a case's image, shared by every class list

    @property
    def name(self) -> str:
        """The entry's folder relative to the cache folder (``images/...`` for an image entry)."""
        return f"{IMAGES}/{self.path.name}" if self.kind == "image" else self.path.name


STALE_BUILD_S = 24 * 3600.0
"""A temporary build folder older than this belongs to a build that was killed."""


def cache_entries(cache_dir: str | Path) -> list[CacheEntry]:
    """Every entry (and leftover temporary build folder) under ``cache_dir``, oldest use first."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise FileNotFoundError(f"cache folder {cache_dir} does not exist")
    hashes = FileHashes(cache_dir)
    out = []
    images = cache_dir / IMAGES
    folders = [p for p in cache_dir.iterdir() if p.is_dir() and p != images]
    folders += sorted(p for p in images.iterdir() if p.is_dir()) if images.is_dir() else []
    for path in folders:
        kind = "image" if path.parent == images else "labels"
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if path.name.startswith("."):
            age = time.time() - path.stat().st_mtime
            why = "interrupted build" if age > STALE_BUILD_S else None  # else: a build in progress
            out.append(CacheEntry(path, path.name, [], size, path.stat().st_mtime, why, kind))
            continue
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            out.append(
                CacheEntry(path, path.name, [], size, path.stat().st_mtime, "no readable meta.json", kind)
            )
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
        out.append(CacheEntry(path, meta.get("case_id", path.name), classes, size, used, stale, kind))
    hashes.save()
    return sorted(out, key=lambda e: (e.last_used, e.name))


def remove_entry(entry: CacheEntry) -> None:
    """Remove one entry: renamed out of its key first, so no run can open it half-deleted.

    A run that already has its arrays open keeps reading them (POSIX keeps unlinked files alive).
    """
    doomed = entry.path.with_name(f".{entry.path.name}.removing")
    os.replace(entry.path, doomed)
    shutil.rmtree(doomed)
