"""What limits the two-stage model: an ablation on the validation split (never the test split).

From one trained checkpoint, the same validation samples are scored (on each scan's own grid, as
validation does) with parts of the pipeline swapped for the truth or removed:
- as trained: stage 1's band (``active_margin`` cells) and stage 1's sign elsewhere;
- wider band at inference: ``active_margin`` + 1;
- stage 1 alone: the coarse occupancy as the surface, no decoder;
- oracle stage 1: the true coarse occupancy decides the band and the sign, the decoder the rest
  (how much stage 1's errors cost);
- grid cap: the true SDF sampled on the frame's (4R+1)^3 vertex grid (what a perfect decoder at this
  frame and resolution would score).

    python benchmarks/experiments/ablation.py --ckpt outputs/experiment/b/checkpoints/best.ckpt [--views 3] [--context none] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lora_sam3d.data import TSDataModule
from lora_sam3d.inputs import Batch
from lora_sam3d.metrics import MeshMetrics
from lora_sam3d.models import Reconstruction
from lora_sam3d.models.structure import vertex_fill
from lora_sam3d.predict.records import score_batch
from lora_sam3d.settings.old_keys import upgrade
from lora_sam3d.training.module import LoRAMeshDecoderModule

ROWS = ("as trained", "wider band at inference", "stage 1 alone", "oracle stage 1", "grid cap (true SDF)")


class Ablated(LoRAMeshDecoderModule):
    """The trained module with one part swapped for the truth or removed (see the rows above)."""

    mode = "as trained"

    def forward(self, batch: Batch) -> Reconstruction:
        n = 4 * self.resolution
        if self.mode == "grid cap (true SDF)":
            return Reconstruction(batch.targets.sdf.float())
        if self.mode == "stage 1 alone":
            logits, _ = self.structure(self.model.stage_one_input(batch.evidence))
            return Reconstruction(
                vertex_fill(logits > 0, n), logits, torch.ones_like(logits, dtype=torch.bool)
            )
        if self.mode == "oracle stage 1":
            truth = batch.targets.coarse_occupancy.bool()
            handle = self.structure.register_forward_hook(
                lambda _m, _a, out: (torch.where(truth, 10.0, -10.0).to(out[0].dtype), out[1])
            )
            try:
                return super().forward(batch)
            finally:
                handle.remove()
        return super().forward(batch)


def score(module: Ablated, dm: TSDataModule) -> dict[str, float]:
    metrics = MeshMetrics(module.classes or [], module.steps.nsd_tolerance_mm)
    actives = []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            rec = module(batch)
            if rec.active is not None:
                actives += rec.active_counts()
            scored = score_batch(rec, batch, module.steps.nsd_tolerance_mm)
            metrics.update([s.metrics for s in scored if s], batch.info.class_index)
    out = {k: float(v) for k, v in metrics.compute().items() if "/" not in k}
    out |= {f"dice/{c}": float(metrics.compute()[f"dice/{c}"]) for c in module.classes or []}
    out["active_voxels_per_sample"] = sum(actives) / max(len(actives), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True)
    parser.add_argument(
        "--views", type=int, help="input slices per sample (default: as the checkpoint validated)"
    )
    parser.add_argument(
        "--context", choices=("volume", "none"), help="the scan as context (default: as trained)"
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    module = Ablated.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True).eval()
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    data = upgrade(ckpt["datamodule_hyper_parameters"], "data", warn=False)  # earlier flat ones too
    data["loader"] = {**(data.get("loader") or {}), "num_workers": 0}
    data.pop("_instantiator", None)
    if args.views:
        data.setdefault("views", {})["count"] = args.views
    if args.context:
        data.setdefault("context", {})["source"] = args.context
    dm = TSDataModule(**data)
    dm.setup("validate")
    module.classes = list(data["classes"])
    results = []
    margin = module.model.config.band.margin
    for row in ROWS:
        module.mode = row
        module.model.set_band(margin=margin + 1 if row == "wider band at inference" else margin)
        values = score(module, dm)
        results.append({"row": row, **values})
        print(f"{row:28s} Dice {values['dice']:.3f}  HD95 {values['hd95_mm']:.2f} mm  NSD {values['nsd']:.3f}  "
              f"myocardium {values.get('dice/heart_myocardium', float('nan')):.3f}  "
              f"active {values['active_voxels_per_sample']:.0f}", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
