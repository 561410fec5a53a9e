"""The scan as context and evidence at every level: what they cost, measured in one run.

1. The demo's LoRA training step (forward + backward + AdamW, demo size, batch 8) at three orthogonal
   views: today's model (``builtin:shapes``, slices only) against the model that reads the scan and
   conditions every decoder level (``builtin:scan_shapes``, ``data.context: volume``), on the same
   samples; and building one sample with and without the context crop.
2. A request on a phantom scan (`PredictionDataset`, the predict code path: reading the files,
   resampling, the views, the context, then the model in eval mode) from one axial slice against 16
   axial slices of the same scan.

Prints times and the ratios; the bars are a training step <= 1.3x today's at three views and a
16-slice request <= 2x a one-slice request.

    python benchmarks/context_step.py [--repeats 5] [--batch 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from coarse_to_fine import two_stage  # benchmarks/ is the script's folder

from lora_sam3d.data import HEART_CLASSES, DataSettings, TS_SAM3D_Dataset, collate, write_phantoms
from lora_sam3d.data.requests import PredictionDataset
from lora_sam3d.data.settings import DataContract
from lora_sam3d.models import ModelConfig, Reconstructor

DEMO = {"resolution": 16, "model_channels": 64, "num_blocks": 4, "num_heads": 4, "num_groups": 8}
CONTEXT_MODEL = {"context": {"read": True, "conditioning": True}}


def dataset(root: Path, context: str) -> TS_SAM3D_Dataset:
    settings = DataSettings(
        preprocessing={"spacing_mm": 1.5},
        views={"count": 3},
        context={"source": context},  # type: ignore[arg-type]
    )
    return TS_SAM3D_Dataset(
        root, HEART_CLASSES, split="val", slice_sampling_method="central", settings=settings
    )


def median_seconds(run: Any, n: int) -> float:
    times = []
    for i in range(n):
        start = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_rows(root: Path, batch_size: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name, context, base, model in (
        ("slices only (today)", "none", "builtin:shapes", {}),
        ("scan as context + conditioning", "volume", "builtin:scan_shapes", CONTEXT_MODEL),
    ):
        ds = dataset(root, context)
        batch = collate([ds[i] for i in range(batch_size)])
        step = two_stage(batch, repeats, base, **model)["step_s"]
        rows.append({"model": name, "step_s": step, "sample_s": median_seconds(lambda i: ds[i], batch_size)})  # noqa: B023
    for r in rows:
        r["step_x_today"], r["sample_x_today"] = (
            r["step_s"] / rows[0]["step_s"],
            r["sample_s"] / rows[0]["sample_s"],
        )
    return rows


def request_rows(root: Path, repeats: int) -> list[dict[str, Any]]:
    """One scan's left ventricle from its middle axial slice, then from 16 axial slices."""
    case = root / "s0001"
    image, mask = case / "ct.nii.gz", case / "segmentations" / "heart_ventricle_left.nii.gz"
    z = np.flatnonzero((np.asarray(nib.load(mask).dataobj) > 0).any(axis=(0, 1)))
    picks = z[np.linspace(0, len(z) - 1, 16).round().astype(int)]
    model = Reconstructor(
        ModelConfig(DEMO, base={"checkpoint": "builtin:scan_shapes"}, **CONTEXT_MODEL)
    ).eval()
    extent = {"heart_ventricle_left": 80.0}
    contract = DataContract(
        ["heart_ventricle_left"], extent, 1.5, "ct", [-200.0, 400.0], 64, 2.0, 16, 16, "stack"
    )
    rows = []
    for slices in ([int(z.mean())], [int(i) for i in picks]):
        item = {"image": str(image), "mask": str(mask), "class_name": "heart_ventricle_left",
                "slices": [{"axis": "axial", "index": i} for i in slices]}  # fmt: skip
        requests = PredictionDataset.from_settings([item], contract, context="volume")

        def run(_: int, requests: PredictionDataset = requests) -> None:
            with torch.no_grad():
                model(collate([requests[0]]).evidence)

        rows.append({"slices": len(slices), "request_s": median_seconds(run, repeats)})
    for r in rows:
        r["x_one_slice"] = r["request_s"] / rows[0]["request_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cases", type=int, default=6, help="heart phantoms to write (>= 3)")
    parser.add_argument("--json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lora-sam3d-context-")) / "heart"
    write_phantoms(root, n_cases=args.cases, kind="heart")
    training = training_rows(root, args.batch, args.repeats)
    for r in training:
        print(f"{r['model']}: training step {r['step_s'] * 1e3:.0f} ms per batch of {args.batch} "
              f"({r['step_x_today']:.2f}x today), building a sample {r['sample_s'] * 1e3:.0f} ms ({r['sample_x_today']:.2f}x)")  # fmt: skip
    requests = request_rows(root, args.repeats)
    for r in requests:
        print(f"request from {r['slices']} slice{'s' if r['slices'] > 1 else ''}: {r['request_s'] * 1e3:.0f} ms "
              f"({r['x_one_slice']:.2f}x one slice)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(
            json.dumps({"batch": args.batch, "training": training, "requests": requests}, indent=2)
        )


if __name__ == "__main__":
    main()
