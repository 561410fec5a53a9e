"""Data loading speed: cold cache build per case, warm samples/s with 0 and 2 workers, vs a training step.

Phantoms of realistic size (default 256 x 256 x 200 voxels at 1.5 x 1.5 x 1.5 mm before the
affine's tilt) are written once to a scratch folder; the cache is built cold and timed per case;
then samples are drawn from the warm cache (random_axis, batch 4) with 0 and 2 DataLoader
workers. The baseline, in the same run, is one LoRA training step of the tiny decoder
(`TINY_DECODER`) on a batch of 4 sparse inputs shaped like slices unprojected into
the frame (shells of ~8% occupancy, the `tiny` case of benchmarks/decoder.py).

    python benchmarks/data.py [--cases 3] [--shape 256 256 200] [--batches 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lora_sam3d.data import HEART_CLASSES, TS_SAM3D_Dataset, collate, write_phantoms
from lora_sam3d.lora import freeze_base_params, inject_lora
from lora_sam3d.models import SLatMeshDecoder
from lora_sam3d.sparse import SparseTensor

sys.path.insert(0, str(Path(__file__).parent))
from decoder import shell_coords


def training_step_seconds(batch: int, repeats: int = 5) -> float:
    torch.manual_seed(0)
    model = SLatMeshDecoder(
        resolution=16, model_channels=128, latent_channels=8, num_blocks=4, num_heads=4, num_groups=16
    )
    inject_lora(model, target_modules=["to_qkv", "to_out"], rank=4, alpha=8)
    freeze_base_params(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    coords = shell_coords(16, 0.08, batch=batch)
    feats = torch.randn(coords.shape[0], 8)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        opt.zero_grad()
        model(SparseTensor(feats, coords)).feats.square().mean().backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 200))
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 1.5))
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    scratch = Path(tempfile.mkdtemp(prefix="lora-sam3d-bench-"))
    try:
        root, cache = scratch / "data", scratch / "cache"
        start = time.perf_counter()
        write_phantoms(root, n_cases=args.cases, shape=args.shape, spacing=args.spacing)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        ds = TS_SAM3D_Dataset(
            root, HEART_CLASSES, augment=True, preprocessing={"spacing_mm": 1.5}, cache_dir=cache
        )
        cold_s = (time.perf_counter() - start) / args.cases
        start = time.perf_counter()
        TS_SAM3D_Dataset(root, HEART_CLASSES, preprocessing={"spacing_mm": 1.5}, cache_dir=cache)
        reopen_s = time.perf_counter() - start
        rows = {"cases": args.cases, "shape": list(args.shape), "phantom_write_s_per_case": write_s / args.cases,
                "cold_cache_s_per_case": cold_s, "warm_reopen_s": reopen_s}  # fmt: skip
        for workers in (0, 2):
            loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=workers, collate_fn=collate,
                                generator=torch.Generator().manual_seed(0), persistent_workers=workers > 0)  # fmt: skip
            it = iter(loader)
            next(it)  # start workers, first maps
            start = time.perf_counter()
            n = 0
            for _, batch in zip(range(args.batches), it, strict=False):
                n += len(batch)
            rows[f"samples_per_s_{workers}w"] = n / (time.perf_counter() - start)
        step = training_step_seconds(args.batch_size)
        rows["tiny_train_step_s"] = step
        rows["tiny_train_samples_per_s"] = args.batch_size / step
        for workers in (0, 2):
            rows[f"loading_speedup_vs_training_{workers}w"] = (
                rows[f"samples_per_s_{workers}w"] / rows["tiny_train_samples_per_s"]
            )
        print(json.dumps(rows, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
