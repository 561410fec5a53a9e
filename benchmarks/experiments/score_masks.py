"""Score predicted masks written on the source scans' grids (``*_mask.nii.gz``) against the scans' own
label files, with the same functions validation uses (Dice, HD95, ASSD, NSD on each scan's grid).

Any tool's masks can be scored this way; the experiment uses it to put the one-stage design's
predictions (an older version of this project, whose own metrics were on the frame's grid) on the
same footing as today's.

    python benchmarks/experiments/score_masks.py --predictions DIR --data DIR --classes c1 c2 ... [--json out.json]

Mask files are named ``<case>_<class>_axis<a>_slice<i>_mask.nii.gz``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np

from lora_sam3d.data.cases import discover_cases
from lora_sam3d.data.labels import read_labels
from lora_sam3d.metrics import sample_metrics


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--predictions", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--classes", nargs="+", required=True)
    parser.add_argument("--json")
    args = parser.parse_args()
    cases = {c.case_id: c for c in discover_cases(Path(args.data), args.classes)}
    per_class: dict[str, list[dict[str, float]]] = defaultdict(list)
    pattern = re.compile(
        r"(?P<case>.+?)_(?P<cls>" + "|".join(map(re.escape, args.classes)) + r")_axis\d_slice\d+_mask"
    )
    for path in sorted(Path(args.predictions).glob("*_mask.nii.gz")):
        match = pattern.fullmatch(path.name.removesuffix(".nii.gz"))
        if match is None:
            continue
        case, cls = cases[match["case"]], match["cls"]
        label_path, value = case.class_masks[args.classes.index(cls)]
        img = nib.load(str(label_path))
        labels = read_labels(img, label_path)
        gt = labels != 0 if value is None else labels == value
        pred = np.asarray(nib.load(str(path)).dataobj) > 0
        spacing = np.linalg.norm(img.affine[:3, :3], axis=0)
        per_class[cls].append(sample_metrics(pred, gt, spacing, 3.0))
    result = {}
    for cls in args.classes:
        rows = per_class.get(cls, [])
        result[cls] = {
            k: float(np.mean([r[k] for r in rows if np.isfinite(r[k])])) for k in ("dice", "hd95_mm", "nsd")
        }
        result[cls]["samples"] = len(rows)
    result["mean"] = {
        k: float(np.mean([result[c][k] for c in args.classes])) for k in ("dice", "hd95_mm", "nsd")
    }
    for name, values in result.items():
        print(
            f"{name:24s} Dice {values['dice']:.3f}  HD95 {values['hd95_mm']:.2f} mm  NSD {values['nsd']:.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
