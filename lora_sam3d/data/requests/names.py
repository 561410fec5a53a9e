"""What outputs are called: a case id per scan (`case_names`, distinct for distinct files) and a
sample's stem (`output_stem`), used by every file a prediction writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lora_sam3d.data.nifti import DataError

__all__ = ["case_name", "case_names", "output_stem"]


def case_names(images: Sequence[str | Path]) -> list[str]:
    """A case id per image, distinct for distinct files: `case_name`, prefixed by as many parent
    folders as it takes where two files would share one (``p1/CT/ct.nii.gz`` and ``p2/CT/ct.nii.gz``
    -> ``p1-CT`` and ``p2-CT``); other files keep their plain case name."""
    paths = [Path(i).resolve() for i in images]
    depth = dict.fromkeys(paths, 0)

    def name(path: Path) -> str:
        folders = (
            path.parent.parts[1:]
            if path.name.split(".")[0] in ("ct", "image", "mr", "mri")
            else path.parts[1:-1]
        )
        parents = folders[: len(folders) - 1] if folders and case_name(path) == folders[-1] else folders
        return "-".join(
            [*parents[len(parents) - depth[path] :], case_name(path)] if depth[path] else [case_name(path)]
        )

    while True:
        groups: dict[str, set[Path]] = {}
        for path in depth:
            groups.setdefault(name(path), set()).add(path)
        clashes = [g for g in groups.values() if len(g) > 1]
        if not clashes:
            return [name(p) for p in paths]
        for group in clashes:
            for path in group:
                if depth[path] >= len(path.parts):
                    raise DataError(f"cannot name the outputs of {sorted(map(str, group))} apart")
                depth[path] += 1


def case_name(image: str | Path) -> str:
    """The case id of an image: its folder for TotalSegmentator's ``<case>/ct.nii.gz`` (or ``mri.nii.gz``), else the file stem."""
    path = Path(image)
    stem = path.name.removesuffix(".gz").removesuffix(".nii")
    return path.parent.name if stem in ("ct", "image", "mr", "mri") and path.parent.name else stem


def output_stem(case_id: str, class_name: str, slice_name: str, scan_read: bool | None) -> str:
    """``<case>_<class>_<slices>``, with ``_noscan`` when ``scan_read`` is False (a model that
    reads the scan asked to reconstruct from the slices alone): the names of one request read
    with and without the scan differ."""
    return f"{case_id}_{class_name}_{slice_name}{'_noscan' if scan_read is False else ''}"
