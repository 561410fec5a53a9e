"""A tissue model per request (`lora_sam3d.data.tissue_forest`) against today's relative reading, on
held-out CT phantoms, MR-like phantoms of another seed and the real aorta CT: one slice, three
orthogonal slices and a 10 mm axial stack per structure, each request run several ways through
`lora_sam3d.reconstruct` with the demo's adapter (``--variants``; `VARIANTS` names the others and
how levers run together):

- ``relative``: the scan read relative to the drawn tissue (the demo as trained);
- ``forest``: the scan read through a random forest fitted on the drawn slices (its probability
  replaces the relative reading at inference; the adapter was trained on the relative reading);
- ``forest alone``: that forest's probability thresholded at 0.5 in the frame, the pieces touching
  the drawing kept (no learned shape: the baseline the model must beat);
- ``slices only``: no scan.

Scores on each scan's own grid (Dice, HD95), the time per request, written to
``docs/tissue_model.json`` with a Markdown table on stdout. The real CT's structures are given a
frame extent from their own mask (the demo's adapter knows only heart structures); nothing is tuned
on it.

    python benchmarks/experiments/tissue_model.py --adapter outputs/demo/checkpoints/adapter-best
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage
from tissue_forest import forest_sample

import lora_sam3d
import lora_sam3d.data.requests.dataset as requests_dataset
import lora_sam3d.data.requests.masks as request_masks
from lora_sam3d import reconstruct
from lora_sam3d.data.tissue_forest import training_cells
from lora_sam3d.geometry import sdf_on_grid
from lora_sam3d.metrics import sample_metrics
from lora_sam3d.models import Reconstructor

ROOT = Path(__file__).resolve().parents[2]
RELATIVE = requests_dataset.relative_sample
DRAWN_SHARE, ONE_SHARE = request_masks.DRAWN_FRAME_SHARE, request_masks.ONE_SLICE_FRAME_SHARE
HEART = [
    "heart_myocardium",
    "heart_atrium_left",
    "heart_ventricle_left",
    "heart_atrium_right",
    "heart_ventricle_right",
]
SEEN: dict[str, Any] = {}
VARIANTS = ["relative", "forest", "slices only", "drawing's frame"]
"""The ways each request runs (``--variants`` picks some); "drawing's frame": the structure named to
no class, so its frame comes from its drawn slices (`lora_sam3d.predict.user_inputs.drawing_extent_mm`);
"drawing's frame, share S" the same with a frame of S x the model's frame scale for several slices
(`lora_sam3d.data.requests.masks.DRAWN_FRAME_SHARE`, its default in the product); "auto frame" the
product's rule (the drawing's frame for several slices, the class's for one). Levers joined by
" + " run together: "forest + auto frame + test-time LoRA" (test-time LoRA: `ADAPT_STEPS` on
several slices)."""
SHARE = "drawing's frame, share "
ONE_SLICE = "one slice's share "
"""A lever "one slice's share S": a class's frame for one slice at S x the model's frame scale
(`lora_sam3d.data.requests.masks.ONE_SLICE_FRAME_SHARE`, its default in the product)."""
ADAPT_STEPS, ADAPT_LR = 8, 3e-4
"""A variant ending "+ test-time LoRA" runs these steps on several slices (`test_time_lora.py`; the
rate that cost nothing on the validation phantoms)."""
LAYOUTS = ["one slice", "three orthogonal", "10 mm stack"]


def forest_reading(sample: dict[str, Any], tissue: Any, inside: np.ndarray) -> None:
    """The relative reading's place taken by the request's forest (the relative one where it cannot fit)."""
    context = sample.get("context")
    if context is not None:
        cells, labels = training_cells(sample, np.asarray(context)[1] > 0)
        SEEN["drawn"] = cells[labels == 1]
    if forest_sample(sample, inside):
        SEEN["prob"] = np.asarray(sample["context"])[0].copy()
        return
    SEEN["prob"] = None
    RELATIVE(sample, tissue, inside)


def forest_alone(prediction: Any, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """The forest's probability > 0.5 in the frame, its pieces touching the drawn cells, on the scan's grid."""
    prob = SEEN.get("prob")
    if prob is None:
        return None
    n = prob.shape[0]
    labels, _ = ndimage.label(prob > 0.5, structure=np.ones((3, 3, 3)))
    drawn = SEEN["drawn"]
    keep = set(np.unique(labels[drawn[:, 0], drawn[:, 1], drawn[:, 2]]).tolist()) - {0}
    kept = np.isin(labels, sorted(keep)).astype(np.float32)
    v = np.arange(n + 1) - 0.5  # vertex v of the SDF grid sits at cell coordinate v - 1/2
    grid = np.stack(np.meshgrid(v, v, v, indexing="ij"))
    value = ndimage.map_coordinates(kept, grid, order=1, mode="nearest")
    return sdf_on_grid(0.5 - value, prediction.frame_to_world, affine, shape)


def layouts(truth: np.ndarray, spacing: np.ndarray) -> dict[str, dict[str, Any]]:
    """One central axial slice, three central orthogonal slices, a 10 mm axial stack (up to 16)."""
    centre = [
        int(np.flatnonzero(truth.any(axis=tuple(b for b in range(3) if b != a))).mean()) for a in range(3)
    ]
    z = np.flatnonzero(truth.any(axis=(0, 1)))
    step = max(1, round(10.0 / spacing[2]))
    stack = list(range(int(z[0]) + step // 2, int(z[-1]) + 1, step))[:16] or [centre[2]]
    names = ("sagittal", "coronal", "axial")
    return {
        "one slice": {"axis": "axial", "index": centre[2]},
        "three orthogonal": {"slices": [{"axis": names[a], "index": centre[a]} for a in (2, 0, 1)]},
        "10 mm stack": {"slices": [{"axis": "axial", "index": i} for i in stack]}
        if len(stack) > 1
        else {"axis": "axial", "index": stack[0]},
    }


def run_case(
    model: Reconstructor, image: Path, masks: dict[str, Path], extents: dict[str, float] | None
) -> list[dict[str, Any]]:
    scan = nib.load(image)
    spacing = np.abs(np.linalg.norm(scan.affine[:3, :3], axis=0))
    rows = []
    for name, mask in masks.items():
        truth = np.asarray(nib.load(mask).dataobj) > 0
        if truth.sum() < 50:
            continue
        # the others framed by the class, as given (reconstruct frames several slices by their drawing
        # unless an extent is given)
        by_class = extents or model.data_contract["extent_mm"]
        for layout, where in layouts(truth, spacing).items():
            if layout not in LAYOUTS:
                continue
            first = len(rows)
            for variant in VARIANTS:
                levers = variant.split(" + ")  # "forest + auto frame + test-time LoRA": levers together
                steps = ADAPT_STEPS if "test-time LoRA" in levers and "slices" in where else 0
                requests_dataset.relative_sample = forest_reading if "forest" in levers else RELATIVE
                frame = next((v for v in levers if v.endswith("frame") or v.startswith(SHARE)), "")
                share = float(frame.removeprefix(SHARE)) if frame.startswith(SHARE) else DRAWN_SHARE
                request_masks.DRAWN_FRAME_SHARE = share
                one = next(
                    (float(v.removeprefix(ONE_SLICE)) for v in levers if v.startswith(ONE_SLICE)), ONE_SHARE
                )
                request_masks.ONE_SLICE_FRAME_SHARE = one
                start = time.perf_counter()
                # no class: the frame from the slices drawn ("auto frame": for several slices only)
                own_frame = frame.startswith("drawing's frame") or (
                    frame == "auto frame" and "slices" in where
                )
                try:
                    result = reconstruct(model, image, mask, None if own_frame else name,
                                         context="slices only" not in levers, extent_mm=None if own_frame else by_class,
                                         adapt_steps=steps, adapt_lr=ADAPT_LR, **where)  # fmt: skip
                except Exception as err:
                    rows.append(
                        {"structure": name, "layout": layout, "variant": variant, "error": str(err)[:200]}
                    )
                    continue
                seconds = time.perf_counter() - start
                m = result.prediction.metrics or {}
                rows.append({"structure": name, "layout": layout, "variant": variant, "dice": m.get("dice"),
                             "hd95_mm": m.get("hd95_mm"), "seconds": seconds})  # fmt: skip
                if variant == "forest":  # the forest's own answer, once
                    alone = forest_alone(result.prediction, scan.affine, scan.shape)
                    if alone is not None:
                        s = sample_metrics(alone, truth, spacing)
                        rows.append({"structure": name, "layout": layout, "variant": "forest alone",
                                     "dice": s["dice"], "hd95_mm": s["hd95_mm"], "seconds": seconds})  # fmt: skip
            print(f"  {image.parent.name} {name} {layout}: " + ", ".join(
                f"{r['variant']} {r.get('dice', float('nan')):.3f}" for r in rows[first:] if "dice" in r), flush=True)  # fmt: skip
    requests_dataset.relative_sample, request_masks.DRAWN_FRAME_SHARE = RELATIVE, DRAWN_SHARE
    request_masks.ONE_SLICE_FRAME_SHARE = ONE_SHARE
    return rows


def data_sets(mr_root: Path) -> dict[str, list[tuple[Path, dict[str, Path], dict[str, float] | None]]]:
    def heart(cases: tuple[str, ...]) -> list[tuple[Path, dict[str, Path], None]]:
        return [(ROOT / "data" / "heart" / c / "ct.nii.gz", {k: ROOT / "data" / "heart" / c / "segmentations" / f"{k}.nii.gz" for k in HEART}, None)
                for c in cases]  # fmt: skip

    ct = heart(("s0017", "s0018", "s0019", "s0020"))
    if not mr_root.exists():
        subprocess.run([sys.executable, "-m", "lora_sam3d.cli", "phantoms", "--root", str(mr_root), "--n-cases", "4",
                        "--seed", "23", "--modality", "mr"], check=True)  # fmt: skip
    mr = [
        (c / "mri.nii.gz", {k: c / "segmentations" / f"{k}.nii.gz" for k in HEART}, None)
        for c in sorted(mr_root.glob("s0*"))
    ]
    real = ROOT.parent / "shared" / "data" / "real_ct_aorta" / "a0001"
    masks = {p.name.removesuffix(".nii.gz"): p for p in sorted((real / "segmentations").glob("*.nii.gz"))}
    extents = {}
    for name, path in masks.items():
        img = nib.load(path)
        nz = np.argwhere(np.asarray(img.dataobj) > 0)
        if len(nz):
            extents[name] = float(
                ((nz.max(0) - nz.min(0) + 1) * np.linalg.norm(img.affine[:3, :3], axis=0)).max()
            )
    return {
        "CT phantoms (held out)": ct,
        "CT phantoms (validation)": heart(("s0013", "s0014", "s0015", "s0016")),  # to choose rules on
        "MR-like phantoms (seed 23)": mr,
        "real aorta CT": [(real / "ct.nii.gz", masks, extents)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter", default="outputs/demo/checkpoints/adapter-best")
    parser.add_argument("--mr-root", default=str(ROOT / "data" / "heart-mr-seed23"))
    parser.add_argument("--json", default=str(ROOT / "docs" / "tissue_model.json"))
    parser.add_argument("--sets", nargs="*", default=None, help="data set names (default: all)")
    parser.add_argument("--variants", nargs="*", default=None,
                        help=f"of {VARIANTS} or '{SHARE}S' (default: {', '.join(VARIANTS)})")  # fmt: skip
    parser.add_argument("--layouts", nargs="*", default=None, help=f"of {LAYOUTS} (default: all)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    model = lora_sam3d.load_model(args.adapter)  # an adapter folder or a checkpoint
    if args.variants:
        VARIANTS[:] = args.variants
    if args.layouts:
        LAYOUTS[:] = args.layouts
    out: dict[str, Any] = {}
    for name, cases in data_sets(Path(args.mr_root)).items():
        if args.sets and name not in args.sets:
            continue
        print(name, flush=True)
        out[name] = [
            r | {"case": str(image.parent.name)}
            for image, masks, ext in cases
            for r in run_case(model, image, masks, ext)
        ]
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(table(out))


def table(out: dict[str, list[dict[str, Any]]]) -> str:
    named = ["relative", "forest", "forest alone", "slices only", "drawing's frame"]
    seen = list(dict.fromkeys(r["variant"] for rows in out.values() for r in rows))
    variants = [v for v in named if v in seen] + [v for v in seen if v not in named]
    lines = [
        "| data | input | " + " | ".join(variants) + " | s per request (each but forest alone) |",
        "|---|---|" + "---|" * (len(variants) + 1),
    ]
    for name, rows in out.items():
        for layout in LAYOUTS:
            cells = []
            for v in variants:
                got = [
                    r
                    for r in rows
                    if r["layout"] == layout and r["variant"] == v and r.get("dice") is not None
                ]
                dice = np.mean([r["dice"] for r in got]) if got else float("nan")
                hd = (
                    np.median([r["hd95_mm"] for r in got if np.isfinite(r["hd95_mm"])])
                    if got
                    else float("nan")
                )
                cells.append(f"{dice:.3f} ({hd:.1f} mm)")
            seconds = [
                np.median(
                    [
                        r["seconds"]
                        for r in rows
                        if r["layout"] == layout and r["variant"] == v and "seconds" in r
                    ]
                    or [np.nan]
                )
                for v in variants
                if v != "forest alone"  # timed with its forest
            ]
            lines.append(
                f"| {name} | {layout} | "
                + " | ".join(cells)
                + " | "
                + " / ".join(f"{t:.1f}" for t in seconds)
                + " |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
