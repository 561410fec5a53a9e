"""Does the scan's intensity sharpen the predicted boundary? A post-processing lever measured, not
adopted: within ``band`` mm of the predicted surface (its SDF read trilinearly on the scan's own
grid), a voxel is inside where its intensity (Gaussian-smoothed, 1 mm) lies closer, in robust
standard units, to the drawn pixels' median than to that of a 5 mm ring around them on the drawn
slices; deeper inside stays inside, farther out stays out; then a 1-voxel opening and the pieces
touching the drawing. The requests and sets of `tissue_model.py`, the demo's adapter, scored on
each scan's grid (``docs/band_refinement.json``, a Markdown table on stdout).

    python benchmarks/experiments/band_refinement.py --sets "CT phantoms (validation)" "real aorta CT" --bands 1.5 3 6
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage
from tissue_model import ROOT, data_sets, layouts

import lora_sam3d
from lora_sam3d import reconstruct
from lora_sam3d.data.tissue import RING_MM
from lora_sam3d.geometry import box_to_sdf_index, frame_box
from lora_sam3d.metrics import sample_metrics

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def sdf_mm_on_scan(
    prediction: Any, affine: np.ndarray, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """The prediction's vertex SDF read trilinearly at the scan's voxel centres over the frame's box,
    in mm, and the box's lower corner (as `lora_sam3d.geometry.sdf_on_box` reads its sign)."""
    lo, hi = frame_box(prediction.frame_to_world, affine, shape)
    sdf = np.asarray(prediction.sdf, dtype=np.float32)
    matrix, offset = box_to_sdf_index(sdf.shape[0] - 1, prediction.frame_to_world, affine, lo)
    values = ndimage.affine_transform(sdf, matrix, offset=offset, output_shape=tuple(hi - lo),
                                      order=1, mode="constant", cval=1.0)  # fmt: skip
    return values * float(np.linalg.norm(prediction.frame_to_world[:3, 0])), lo


def refined(image: np.ndarray, drawn: np.ndarray, ring: np.ndarray, sdf_mm: np.ndarray, band_mm: float,
            spacing: np.ndarray) -> np.ndarray | None:  # fmt: skip
    """The band's voxels decided by intensity (module docstring); None without statistics."""
    smooth = ndimage.gaussian_filter(image.astype(np.float32), 1.0 / spacing)
    inside_values, ring_values = smooth[drawn], smooth[ring]
    if inside_values.size < 8 or ring_values.size < 8:
        return None
    stats = []
    for values in (inside_values, ring_values):
        median = float(np.median(values))
        stats.append((median, max(1e-3, 1.4826 * float(np.median(np.abs(values - median))))))
    (m_in, s_in), (m_out, s_out) = stats
    like = np.abs(smooth - m_in) / s_in < np.abs(smooth - m_out) / s_out
    core = sdf_mm < -band_mm
    inside = ndimage.binary_opening(core | ((np.abs(sdf_mm) <= band_mm) & like)) | core
    labels, _ = ndimage.label(inside)
    keep = set(np.unique(labels[drawn & inside]).tolist()) - {0}
    return np.isin(labels, sorted(keep)) if keep else inside


def drawn_and_ring(
    truth: np.ndarray, where: dict[str, Any], spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The drawn pixels (the truth on the request's slices) and the ring `RING_MM` around them there."""
    drawn, ring = np.zeros(truth.shape, dtype=bool), np.zeros(truth.shape, dtype=bool)
    for plane in where.get("slices") or [{"axis": where["axis"], "index": where["index"]}]:
        axis = AXES[plane["axis"]]
        at = tuple(plane["index"] if a == axis else slice(None) for a in range(3))
        mask = truth[at]
        steps = max(1, round(RING_MM / min(s for a, s in enumerate(spacing) if a != axis)))
        drawn[at] = mask
        ring[at] = ndimage.binary_dilation(mask, iterations=steps) & ~mask
    return drawn, ring


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter", default="outputs/demo/checkpoints/adapter-best")
    parser.add_argument("--sets", nargs="*", default=["CT phantoms (validation)", "real aorta CT"])
    parser.add_argument(
        "--bands", nargs="*", type=float, default=[1.5, 3.0, 6.0], help="band half-widths, mm"
    )
    parser.add_argument("--json", default=str(ROOT / "docs" / "band_refinement.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    model = lora_sam3d.load_model(args.adapter)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, cases in data_sets(ROOT / "data" / "heart-mr-seed23").items():
        if name not in args.sets:
            continue
        out[name] = []
        for image_path, masks, extents in cases:
            scan = nib.load(image_path)
            image, spacing = np.asarray(scan.dataobj), np.linalg.norm(scan.affine[:3, :3], axis=0)
            for structure, mask in masks.items():
                truth = np.asarray(nib.load(mask).dataobj) > 0
                if truth.sum() < 50:
                    continue
                for layout, where in layouts(truth, spacing).items():
                    result = reconstruct(model, image_path, mask, structure, extent_mm=extents, **where)
                    row = {"case": image_path.parent.name, "structure": structure, "layout": layout,
                           "model": result.prediction.metrics["dice"]}  # fmt: skip
                    sdf_mm, lo = sdf_mm_on_scan(result.prediction, scan.affine, scan.shape)
                    box = tuple(slice(int(a), int(a) + s) for a, s in zip(lo, sdf_mm.shape, strict=True))
                    drawn, ring = drawn_and_ring(truth, where, spacing)
                    for band in args.bands:
                        got = refined(image[box], drawn[box], ring[box], sdf_mm, band, spacing)
                        if got is not None:
                            full = np.zeros(truth.shape, dtype=bool)
                            full[box] = got
                            row[f"band {band:g} mm"] = sample_metrics(full, truth, spacing)["dice"]
                    out[name].append(row)
                    print(name, json.dumps(row), flush=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    columns = ["model"] + [f"band {b:g} mm" for b in args.bands]
    print("| data | input | " + " | ".join(columns) + " |\n|---|---|" + "---|" * len(columns))
    for name, rows in out.items():
        for layout in ("one slice", "three orthogonal", "10 mm stack"):
            got = [r for r in rows if r["layout"] == layout]
            cells = [f"{np.mean([r[c] for r in got if c in r]):.3f}" for c in columns]
            print(f"| {name} | {layout} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
