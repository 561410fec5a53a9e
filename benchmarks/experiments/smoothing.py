"""What Taubin smoothing of the written meshes does to surface distances, measured once.

Predicts a split with a trained checkpoint twice in one run (two `MeshPredictionWriter`s: smoothing
off and on, same predictions), then compares each predicted mesh with the true surface written
beside it (``_truth.ply``): symmetric Chamfer and HD95 between 20,000 points sampled on each
surface. Prints the per-class means and the ratio smoothed / unsmoothed (the baseline, same run).

    python benchmarks/experiments/smoothing.py --config outputs/experiment/b.yaml \
        --ckpt outputs/experiment/b/checkpoints/best.ckpt --out outputs/smoothing [--iterations 10]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import lightning as L
import numpy as np
import trimesh
import yaml
from scipy.spatial import cKDTree

from lora_sam3d.callbacks import MeshPredictionWriter
from lora_sam3d.data import TSDataModule
from lora_sam3d.settings.old_keys import upgrade
from lora_sam3d.training.module import LoRAMeshDecoderModule


def distances(a: trimesh.Trimesh, b: trimesh.Trimesh, n: int = 20_000) -> tuple[float, float]:
    """(Chamfer, HD95) in mm between two surfaces, from points sampled uniformly on each."""
    pa, _ = trimesh.sample.sample_surface(a, n, seed=0)
    pb, _ = trimesh.sample.sample_surface(b, n, seed=1)
    ab, _ = cKDTree(pb).query(pa)
    ba, _ = cKDTree(pa).query(pb)
    return 0.5 * (ab.mean() + ba.mean()), max(np.percentile(ab, 95), np.percentile(ba, 95))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", default="outputs/smoothing")
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args()
    out = Path(args.out)
    data_cfg = upgrade(yaml.safe_load(Path(args.config).read_text())["data"], "data", f"config {args.config}")
    data_cfg.get("cases", {}).pop("phantoms", None)
    data = TSDataModule(**data_cfg)
    module = LoRAMeshDecoderModule.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True)
    writers = [
        MeshPredictionWriter(
            str(out / name), write_nifti=False, write_png=False, report=False, smooth_iterations=it
        )
        for name, it in (("raw", 0), ("smoothed", args.iterations))
    ]
    L.Trainer(accelerator="cpu", logger=False, callbacks=writers, enable_progress_bar=True).predict(
        module, datamodule=data
    )
    rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for truth_path in sorted((out / "raw").glob("*_truth.ply")):
        stem = truth_path.name.removesuffix("_truth.ply")
        truth = trimesh.load(truth_path, process=False)
        cls = next(c for c in module.classes if f"_{c}_" in f"_{stem.split('_', 1)[1]}")
        for name in ("raw", "smoothed"):
            pred = out / name / f"{stem}.ply"
            if pred.is_file():
                chamfer, hd95 = distances(trimesh.load(pred, process=False), truth)
                rows[cls][f"{name}_chamfer"].append(chamfer)
                rows[cls][f"{name}_hd95"].append(hd95)
    summary = {c: {k: float(np.mean(v)) for k, v in values.items()} for c, values in sorted(rows.items())}
    every = {k: float(np.mean([x for c in rows.values() for x in c[k]])) for k in next(iter(rows.values()))}
    summary["all"] = every
    print(
        f"{'class':24} {'Chamfer raw':>12} {'smoothed':>9} {'ratio':>6} {'HD95 raw':>9} {'smoothed':>9} {'ratio':>6}"
    )
    for cls, v in summary.items():
        print(f"{cls:24} {v['raw_chamfer']:12.2f} {v['smoothed_chamfer']:9.2f} "
              f"{v['smoothed_chamfer'] / v['raw_chamfer']:6.3f} {v['raw_hd95']:9.2f} {v['smoothed_hd95']:9.2f} "
              f"{v['smoothed_hd95'] / v['raw_hd95']:6.3f}")  # fmt: skip
    (out / "smoothing.json").write_text(json.dumps({"iterations": args.iterations, **summary}, indent=2))


if __name__ == "__main__":
    main()
