"""The drawing given back: one trained checkpoint scored on the held-out test split at every layout,
with the drawing blended in near the drawn planes (`lora_sam3d.models.drawing`, the default) and
without it (the network's own surface), beside ITK's fill between slices on the same stacks.

For each layout (one slice, three orthogonal, three parallel 10 mm apart, axial stacks 10 and 20
mm apart) and reading (with the scan, slices only) the test split is run through Lightning's
``Trainer.test`` twice in one process, ``Reconstructor.drawing_width`` 1 then 0, and the logged
``test/dice``, ``test/hd95_mm`` and ``test/drawn_dice`` (the prediction against the drawing on the
drawn planes) are kept. For the stacks (with the scan, drawing kept) the error is then split
between the structure's middle (the scan's voxels between the first and the last drawn plane) and
its two caps (beyond them), for the model and for ITK alike (`caps_and_middle`). Writes
``docs/drawing_experiment.json`` and prints Markdown tables.

    python benchmarks/experiments/drawing_experiment.py --config configs/demo.yaml --ckpt outputs/demo/checkpoints/best.ckpt
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from fill_between_slices import score as itk_score
from regions import region_scores, summarise

from lora_sam3d.data import TSDataModule
from lora_sam3d.geometry import sdf_on_grid
from lora_sam3d.training.module import LoRAMeshDecoderModule

ROOT = Path(__file__).resolve().parents[2]
STACK = {"views": {"count": 16, "layout": "stack"}, "sampling": {"axes": [2]}}
LAYOUTS: dict[str, dict[str, Any]] = {
    "1 slice": {"views": {"count": 1}},
    "3 orthogonal": {"views": {"count": 3, "layout": "orthogonal"}},
    "3 parallel 10 mm": {"views": {"count": 3, "layout": "parallel", "spacing_mm": 10.0}},
    "stack 10 mm": {**STACK, "views": {**STACK["views"], "spacing_mm": 10.0}},
    "stack 20 mm": {**STACK, "views": {**STACK["views"], "spacing_mm": 20.0}},
}


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merged(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def layout_data(data_cfg: dict[str, Any], layout: str, source: str) -> TSDataModule:
    """The data module of one layout of `LAYOUTS`, the scan carried (``volume``) or not (``none``),
    each structure's central slice."""
    cfg = merged(data_cfg, {**LAYOUTS[layout], "context": {"source": source}})
    cfg["sampling"] = {**cfg.get("sampling", {}), "eval": "central"}
    return TSDataModule(**cfg)


def load(ckpt: Path, margin: int | None) -> LoRAMeshDecoderModule:
    """The checkpoint's module; ``margin``: the band's margin at inference instead of the trained one."""
    module = LoRAMeshDecoderModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    if margin is not None:
        module.model.set_band(margin=margin)
    return module


def run(module: LoRAMeshDecoderModule, data_cfg: dict[str, Any]) -> dict[str, Any]:
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    results: dict[str, Any] = {}
    for name in LAYOUTS:
        for source in ("volume", "none"):
            data = layout_data(data_cfg, name, source)
            for width in (1.0, 0.0):
                module.model.drawing_width = width
                (logged,) = trainer.test(module, datamodule=data, verbose=False)
                key = f"{name}, {'scan' if source == 'volume' else 'slices only'}, {'drawing kept' if width else 'network only'}"
                results[key] = {
                    k.removeprefix("test/"): float(v) for k, v in logged.items() if k.startswith("test/")
                }
                print(
                    f"{key}: Dice {results[key]['dice']:.3f}, drawn slices {results[key]['drawn_dice']:.3f}",
                    flush=True,
                )
    return results


def caps_and_middle(
    module: LoRAMeshDecoderModule, data_cfg: dict[str, Any], spacing_mm: float
) -> dict[str, float]:
    """The model's error on a stack's middle and on its caps, on each scan's own grid: a voxel is in
    the middle when its centre lies between the first and the last drawn plane along the stack."""
    data = layout_data(data_cfg, f"stack {spacing_mm:g} mm", "volume")
    data.prepare_data()
    data.setup("test")
    model = module.model.eval()
    model.drawing_width = 1.0
    rows = []
    with torch.no_grad():
        for batch in data.test_dataloader():
            rec, ev = model(batch.evidence), batch.evidence
            for i, native in enumerate(batch.targets.native or []):
                f2w = ev.frame_to_world[i].numpy()
                gt, affine = native["gt"].astype(bool), native["affine"]
                pred = sdf_on_grid(rec.sdf[i].float().numpy(), f2w, affine, gt.shape)
                axis = int(ev.axis[i, 0])
                planes = ev.offset[i][ev.valid[i]].numpy()
                ijk = np.stack(np.meshgrid(*[np.arange(n) for n in gt.shape], indexing="ij"), -1)
                to_frame = np.linalg.inv(f2w) @ affine
                along = ijk @ to_frame[axis, :3] + to_frame[axis, 3]
                half = 0.5 * abs(to_frame[axis, :3]).max()  # half a voxel, in frame units
                middle = (along >= planes.min() - half) & (along <= planes.max() + half)
                rows.append(region_scores(pred, gt, middle))
    return summarise(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--ckpt", default="outputs/demo/checkpoints/best.ckpt")
    parser.add_argument("--json", default=str(ROOT / "docs" / "drawing_experiment.json"))
    parser.add_argument(
        "--itk", action="store_true", help="also ITK's fill between slices (the benchmarks extra)"
    )
    parser.add_argument("--margin", type=int, help="the band's margin at inference (default: as trained)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cfg = yaml.safe_load(Path(args.config).read_text())["data"]
    cfg.get("cases", {}).pop("phantoms", None)
    module = load(Path(args.ckpt), args.margin)  # one module for every layout, then the caps
    results = {"model": run(module, cfg)}
    results["caps and middle"] = {f"stack {mm:g} mm": caps_and_middle(module, cfg, mm) for mm in (10.0, 20.0)}
    if args.itk:
        results["ITK fill between slices"] = {
            f"stack {mm:g} mm": itk_score(Path(cfg["root"]), cfg["classes"], mm) for mm in (10.0, 20.0)
        }
    Path(args.json).write_text(json.dumps(results, indent=2))
    print("| layout | reading | drawing | test Dice | HD95 mm | drawn-slice Dice |")
    print("|---|---|---|---|---|---|")
    for key, v in results["model"].items():
        name, reading, drawing = key.split(", ")
        print(
            f"| {name} | {reading} | {drawing} | {v['dice']:.3f} | {v['hd95_mm']:.2f} | {v['drawn_dice']:.3f} |"
        )
    print("\n| stack | who | middle Dice | caps Dice | share of the wrong voxels in the caps |")
    print("|---|---|---|---|---|")
    for who, key in (("model, scan", "caps and middle"), ("ITK", "ITK fill between slices")):
        for name, v in results.get(key, {}).items():
            v = v.get("caps", v)
            print(
                f"| {name} | {who} | {v['middle_dice']:.3f} | {v['caps_dice']:.3f} | {v['caps_share_of_error']:.2f} |"
            )


if __name__ == "__main__":
    main()
