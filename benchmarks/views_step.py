"""Several views: what a training sample costs at 3 views against 1, measured in one run.

The demo's LoRA training step (forward + backward + AdamW of the two-stage model on the shipped
base, demo size, batch 8) on the same samples given 1 view and 3 orthogonal views (the first view
is the same slice), and the data side: building one sample (`TS_SAM3D_Dataset.__getitem__`, which
resamples each view's plane) at 1 and 3 views. Prints per-sample times and the 3-views / 1-view
ratios; the issue's bar is a training step per sample at 3 views <= 1.3x one view.

    python benchmarks/views_step.py [--repeats 5] [--batch 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lora_sam3d.data import DataSettings, TS_SAM3D_Dataset, collate, write_phantoms
from lora_sam3d.module import LoRAMeshDecoderModule, reconstruction_losses

DEMO = dict(resolution=16, model_channels=64, num_blocks=4, num_heads=4, num_groups=8)
CLASSES = ["heart_myocardium", "heart_atrium_left", "heart_ventricle_left", "heart_atrium_right",
           "heart_ventricle_right"]  # fmt: skip


def dataset(root: Path, views: int) -> TS_SAM3D_Dataset:
    """Validation-split samples (a fixed view count) with the training split's preprocessing."""
    settings = DataSettings(resolution=16, spacing=1.5, views=views, view_layout="orthogonal")
    return TS_SAM3D_Dataset(root, CLASSES, split="val", slice_sampling_method="central", settings=settings)


def sample_seconds(ds: TS_SAM3D_Dataset, n: int) -> float:
    """Median seconds to build one sample, over the first ``n``."""
    times = []
    for i in range(n):
        start = time.perf_counter()
        ds[i]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_seconds(batch: dict[str, Any], repeats: int) -> tuple[float, float]:
    """Median seconds of one LoRA training step on ``batch``, and the decoder's active cells per sample."""
    torch.manual_seed(0)
    module = LoRAMeshDecoderModule(CLASSES, decoder=DEMO, base_checkpoint="builtin:shapes")
    module.configure_adapters()
    module.train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    times, active = [], 0
    for i in range(repeats + 1):  # the first step warms up
        start = time.perf_counter()
        opt.zero_grad()
        rec = module(batch)
        reconstruction_losses(rec, batch, module.hparams, 64)["loss"].backward()
        opt.step()
        active = int(rec.active.sum())
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times), active / len(batch["case_id"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lora-sam3d-views-")) / "heart"
    write_phantoms(root, n_cases=6, kind="heart")
    rows = []
    for views in (1, 3):
        ds = dataset(root, views)
        batch = collate([ds[i] for i in range(args.batch)])
        step, active = step_seconds(batch, args.repeats)
        rows.append({"views": views, "step_s_per_sample": step / args.batch,
                     "data_s_per_sample": sample_seconds(ds, args.batch), "active_cells_per_sample": active})  # fmt: skip
    one = rows[0]
    for r in rows:
        r["step_x_one_view"] = r["step_s_per_sample"] / one["step_s_per_sample"]
        r["data_x_one_view"] = r["data_s_per_sample"] / one["data_s_per_sample"]
        print(f"{r['views']} view{'s' if r['views'] > 1 else ' '}: training step {r['step_s_per_sample'] * 1e3:.0f} ms/sample "
              f"({r['step_x_one_view']:.2f}x one view), building a sample {r['data_s_per_sample'] * 1e3:.0f} ms "
              f"({r['data_x_one_view']:.2f}x), {r['active_cells_per_sample']:.0f} decoder cells/sample")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"batch": args.batch, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
