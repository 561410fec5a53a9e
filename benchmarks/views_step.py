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

from coarse_to_fine import two_stage  # benchmarks/ is the script's folder

from lora_sam3d.data import HEART_CLASSES, DataSettings, TS_SAM3D_Dataset, collate, write_phantoms


def dataset(root: Path, views: int) -> TS_SAM3D_Dataset:
    """Validation-split samples (a fixed view count) with the training split's preprocessing."""
    settings = DataSettings(preprocessing={"spacing_mm": 1.5}, views={"count": views, "layout": "orthogonal"})  # type: ignore[arg-type]
    return TS_SAM3D_Dataset(
        root, HEART_CLASSES, split="val", slice_sampling_method="central", settings=settings
    )


def sample_seconds(ds: TS_SAM3D_Dataset, n: int) -> float:
    """Median seconds to build one sample, over the first ``n``."""
    times = []
    for i in range(n):
        start = time.perf_counter()
        ds[i]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
        timed = two_stage(batch, args.repeats)  # the demo's LoRA step, as coarse_to_fine.py times it
        step, active = timed["step_s"], timed["active_voxels_per_sample"]
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
