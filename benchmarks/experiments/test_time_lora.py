"""Test-time LoRA on a request's own slices (`lora_sam3d.models.test_time`) against none: three
orthogonal slices and a 10 mm axial stack per structure through `lora_sam3d.reconstruct` with the
demo's adapter, on the data sets of `tissue_model.py` (``--sets``) or the validation cases
(``--validation``: where the step count and rate are chosen, never on the test split). Writes
``docs/test_time_lora.json`` (or ``--json``) and prints a Markdown table with the time per request.

    python benchmarks/experiments/test_time_lora.py --validation --steps 8 --lr 0.005 0.02
    python benchmarks/experiments/test_time_lora.py --steps 8 --lr 0.02
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tissue_model import HEART, ROOT, data_sets, layouts

from lora_sam3d import reconstruct
from lora_sam3d.models import Reconstructor


def run(model: Reconstructor, cases: list, settings: list[tuple[int, float]]) -> list[dict[str, Any]]:
    rows = []
    for image, masks, extents in cases:
        spacing = np.linalg.norm(nib.load(image).affine[:3, :3], axis=0)
        for name, mask in masks.items():
            truth = np.asarray(nib.load(mask).dataobj) > 0
            if truth.sum() < 50:
                continue
            for layout, where in layouts(truth, spacing).items():
                if "slices" not in where:
                    continue
                for steps, lr in settings:
                    start = time.perf_counter()
                    r = reconstruct(
                        model, image, mask, name, extent_mm=extents, adapt_steps=steps, adapt_lr=lr, **where
                    )
                    rows.append({"case": image.parent.name, "structure": name, "layout": layout, "steps": steps, "lr": lr,
                                 "dice": r.prediction.metrics["dice"], "hd95_mm": r.prediction.metrics["hd95_mm"],
                                 "seconds": time.perf_counter() - start, "losses": r.adapt_losses})  # fmt: skip
                print(f"  {image.parent.name} {name} {layout}: " + ", ".join(
                    f"{x['steps']}@{x['lr']:g} {x['dice']:.3f}" for x in rows[-len(settings):]), flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter", default="outputs/demo/checkpoints/adapter-best")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, nargs="+", default=[0.02])
    parser.add_argument("--validation", action="store_true", help="the validation cases s0013-s0016")
    parser.add_argument("--sets", nargs="*", default=None)
    parser.add_argument("--json", default=str(ROOT / "docs" / "test_time_lora.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    model = Reconstructor.from_adapter(args.adapter)
    settings = [(0, 0.0)] + [(args.steps, lr) for lr in args.lr]
    heart = ROOT / "data" / "heart"
    if args.validation:
        sets = {"validation CT phantoms": [(heart / c / "ct.nii.gz", {k: heart / c / "segmentations" / f"{k}.nii.gz" for k in HEART}, None)
                                           for c in ("s0013", "s0014")]}  # fmt: skip
    else:
        sets = {
            k: v
            for k, v in data_sets(ROOT / "data" / "heart-mr-seed23").items()
            if not args.sets or k in args.sets
        }
    out = {}
    for name, cases in sets.items():
        print(name, flush=True)
        out[name] = run(model, cases, settings)
    Path(args.json).write_text(json.dumps(out, indent=1))
    for name, rows in out.items():
        for layout in ("three orthogonal", "10 mm stack"):
            for steps, lr in settings:
                got = [r for r in rows if r["layout"] == layout and (r["steps"], r["lr"]) == (steps, lr)]
                if got:
                    print(f"| {name} | {layout} | {steps} steps @ {lr:g} | {np.mean([r['dice'] for r in got]):.3f} | "
                          f"{np.median([r['hd95_mm'] for r in got]):.1f} mm | {np.median([r['seconds'] for r in got]):.1f} s |")  # fmt: skip


if __name__ == "__main__":
    main()
