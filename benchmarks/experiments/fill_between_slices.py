"""What users would pick instead of a model for a stack of slices: ITK's morphological contour
interpolation (3D Slicer's "Fill between slices"), given the true masks on every N-th axial slice.

For every test case of a data folder and each structure, the true mask is kept on the axial file
slices ``spacing_mm`` apart through the structure's middle slice (every slice of that spacing that
holds the structure), ITK's ``MorphologicalContourInterpolator`` fills the slices between them
along that axis, and the result is scored on the scan's own grid against the whole mask with the
functions validation uses (`lora_sam3d.metrics.sample_metrics`). Needs the benchmark extra
(``pip install -e ".[benchmarks]"``); ITK is not a runtime dependency.

    python benchmarks/experiments/fill_between_slices.py --data data/heart --classes c1 c2 ... --spacing_mm 10 20 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from regions import region_scores, summarise

from lora_sam3d.data.cases import discover_cases
from lora_sam3d.data.dataset import assign_splits
from lora_sam3d.data.labels import read_labels
from lora_sam3d.metrics import sample_metrics


def axial_axis(affine: np.ndarray) -> int:
    """The file axis closest to the world's superior-inferior direction."""
    return int(np.argmax(np.abs(affine[2, :3]) / np.linalg.norm(affine[:3, :3], axis=0)))


def kept_slices(gt: np.ndarray, axis: int, step: int) -> list[int]:
    """Every ``step``-th slice along ``axis`` through the structure's middle slice that holds it."""
    present = np.flatnonzero(gt.any(axis=tuple(a for a in range(3) if a != axis)))
    middle = int(np.rint(present.mean()))
    return [int(i) for i in present if (i - middle) % step == 0]


def fill_between(gt: np.ndarray, axis: int, slices: list[int]) -> np.ndarray:
    """ITK's morphological contour interpolation of the masks on ``slices`` along ``axis``."""
    import itk

    sparse = np.zeros(gt.shape, dtype=np.uint8)
    take: list[Any] = [slice(None)] * 3
    for i in slices:
        take[axis] = i
        sparse[tuple(take)] = gt[tuple(take)]
    image = itk.image_from_array(np.ascontiguousarray(sparse.transpose(2, 1, 0)))  # ITK arrays are z, y, x
    filt = itk.MorphologicalContourInterpolator.New(image)
    filt.SetAxis(int(axis))
    filt.Update()
    return itk.array_from_image(filt.GetOutput()).transpose(2, 1, 0) > 0


def score(data: Path, classes: list[str], spacing_mm: float, split: str = "test") -> dict[str, Any]:
    cases = discover_cases(data, classes)
    assign_splits(cases)
    per_class: dict[str, list[dict[str, float]]] = {c: [] for c in classes}
    counts, regions = [], []
    for case in (c for c in cases if c.split == split):
        for bit, name in enumerate(classes):
            path, value = case.class_masks[bit]
            img = nib.load(str(path))
            labels = read_labels(img, path)
            gt = labels != 0 if value is None else labels == value
            if not gt.any():
                continue
            axis = axial_axis(img.affine)
            spacing = np.linalg.norm(img.affine[:3, :3], axis=0)
            slices = kept_slices(gt, axis, max(1, round(spacing_mm / spacing[axis])))
            counts.append(len(slices))
            filled = fill_between(gt, axis, slices)
            per_class[name].append(sample_metrics(filled, gt, spacing, 3.0))
            index = np.arange(gt.shape[axis]).reshape([-1 if a == axis else 1 for a in range(3)])
            middle = np.broadcast_to((index >= min(slices)) & (index <= max(slices)), gt.shape)
            regions.append(region_scores(filled, gt, middle))
    result: dict[str, Any] = {}
    for name, rows in per_class.items():
        result[name] = {
            k: float(np.mean([r[k] for r in rows if np.isfinite(r[k])])) for k in ("dice", "hd95_mm", "nsd")
        }
    result["mean"] = {k: float(np.mean([result[c][k] for c in classes])) for k in ("dice", "hd95_mm", "nsd")}
    result["slices_per_structure"] = float(np.mean(counts))
    result["caps"] = summarise(regions)  # the middle (between the first and last kept slice) and the caps
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--classes", nargs="+", required=True)
    parser.add_argument("--spacing_mm", nargs="+", type=float, default=[10.0, 20.0])
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {}
    for mm in args.spacing_mm:
        r = results[f"{mm:g} mm stack"] = score(Path(args.data), args.classes, mm)
        m = r["mean"]
        print(f"ITK fill between slices, every {mm:g} mm ({r['slices_per_structure']:.1f} slices a structure): "
              f"Dice {m['dice']:.3f}  HD95 {m['hd95_mm']:.2f} mm  NSD {m['nsd']:.3f}  " +
              "  ".join(f"{c}: {r[c]['dice']:.3f}" for c in args.classes))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
