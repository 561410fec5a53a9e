"""A session on a real-size CT: the first answer (loading and resampling included) and then each
drawing, beside today's per-call `lora_sam3d.reconstruct` from files, in one run.

The scan is `request_time.py`'s heart phantom resampled to 512 x 512 x 300 voxels. A drawing is a
3D label array painted on an axial and a sagittal slice of one structure (its true mask there), as
a viewer's labels layer holds it; the session answers the five heart structures in turn, twice.
Printed: the per-call time of `reconstruct` (files in, one request), the session's first answer
(`Session(model, scan)` and its first drawing) and the median of its later drawings as a viewer
asks them (nothing to score; Dice is computed afterwards, untimed), with ratios, and one drawing
scored against its 3D truth (what ``truth=`` adds).

    python benchmarks/session_time.py --adapter outputs/demo/checkpoints/adapter-best
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from request_time import make_scan
from scipy import ndimage

import lora_sam3d
from lora_sam3d.metrics import overlap

CLASSES = [
    "heart_ventricle_left",
    "heart_myocardium",
    "heart_atrium_left",
    "heart_atrium_right",
    "heart_ventricle_right",
]


def drawing_of(mask: np.ndarray) -> np.ndarray:
    """The structure painted on its central axial and sagittal slices."""
    z = int(np.flatnonzero(mask.any(axis=(0, 1))).mean())
    x = int(np.flatnonzero(mask.any(axis=(1, 2))).mean())
    out = np.zeros(mask.shape, dtype=np.uint8)
    out[:, :, z], out[x] = mask[:, :, z], mask[x]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter", default="outputs/demo/checkpoints/adapter-best")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        scan_path, lv_path, index = make_scan(Path(tmp))
        small = next(p for p in (Path(tmp) / "small").iterdir() if p.is_dir()) / "segmentations"
        shape = nib.load(scan_path).shape
        masks = {}
        for name in CLASSES:  # each structure at the big scan's size, as make_scan zooms the ventricle
            m = np.asarray(nib.load(small / f"{name}.nii.gz").dataobj, dtype=np.uint8)
            masks[name] = ndimage.zoom(m, [n / s for n, s in zip(shape, m.shape, strict=True)], order=0) > 0
        model = lora_sam3d.load_model(args.adapter)
        lora_sam3d.reconstruct(model, scan_path, lv_path, CLASSES[0], index=index)  # warm-up (torch, imports)
        start = time.perf_counter()
        lora_sam3d.reconstruct(model, scan_path, lv_path, CLASSES[0], index=index)
        per_call = time.perf_counter() - start
        scan = nib.load(scan_path)
        array = (np.asarray(scan.dataobj), scan.affine)  # the scan as a viewer holds it
        start = time.perf_counter()
        session = lora_sam3d.Session(model, array)
        first = session.reconstruct(drawing_of(masks[CLASSES[0]]), CLASSES[0])
        first_s = time.perf_counter() - start
        later, dice = [], []
        for _ in range(2):
            for name, mask in masks.items():
                start = time.perf_counter()  # as a viewer asks: the drawing only, nothing to score
                result = session.reconstruct(drawing_of(mask), name)
                later.append(time.perf_counter() - start)
                dice.append(overlap(np.asarray(result.mask.dataobj) > 0, mask)[0])  # scored after, untimed
        start = time.perf_counter()
        session.reconstruct(drawing_of(masks[CLASSES[0]]), CLASSES[0], truth=masks[CLASSES[0]])
        scored_s = time.perf_counter() - start
        session.close()
    median = statistics.median(later)
    out = {"scan_shape": list(scan.shape), "reconstruct_per_call_s": per_call, "session_first_answer_s": first_s,
           "session_per_drawing_median_s": median, "session_drawing_scored_s": scored_s, "drawings": len(later), "mean_dice": float(np.mean(dice)),
           "first_slices": first.slices}  # fmt: skip
    print(json.dumps(out, indent=1))
    print(f"reconstruct per call {per_call:.2f} s; session: first answer {first_s:.2f} s, then {median:.2f} s per drawing "
          f"(median of {len(later)}; {per_call / median:.1f}x faster than a call); a drawing scored against "
          f"a 3D truth (HD95, NSD on the scan's grid) {scored_s:.2f} s")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
