"""The cache at TotalSegmentator's size: build time, bytes and peak memory per case, with 1 and 2
worker processes, against the previous cache format measured on the same case in the same run;
DataLoader samples/s with 0 and 2 workers against the training step; the extrapolation to the full
data set.

Two heart phantoms of a body CT's size (``lora-sam3d phantoms --shape 512 512 400 --spacing 0.8 0.8
1.5``, 5 heart structures) are cached at the demo's settings (1.5 mm) by ``lora-sam3d cache
--build`` in a fresh process per run (peak memory = the largest process's resident high-water mark).
The image entry holds the part of the image the heart's frames can read (`image_reach`); a list
of all classes reaches the whole body. The previous format stored the whole image (float16) and a
uint32 label volume per class list; its size is computed from the same grid.

    python benchmarks/cache_build.py [--json out.json] [--shape 512 512 400] [--data folder]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lora_sam3d.data import HEART_CLASSES

ROOT = Path(__file__).resolve().parents[1]
TOTALSEGMENTATOR = {"cases": 1228, "classes": 104}


def lora_sam3d(*args: str) -> tuple[float, int]:
    """Run the command in a fresh process; its wall seconds and the peak resident memory (bytes) of
    the largest process it ran (itself or a worker), measured by a wrapper process of its own."""
    command = [str(Path(sys.executable).parent / "lora-sam3d"), *args]
    wrapper = (
        "import resource, subprocess, sys\n"
        f"subprocess.run({command!r}, check=True)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", wrapper], check=True, cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    lines = done.stdout.strip().splitlines()
    print("\n".join(lines[:-1]))
    return time.perf_counter() - start, int(lines[-1])


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def loader_rate(root: Path, workers: int, batches: int) -> float:
    """Training samples per second through a DataLoader (3 views, the demo's settings, batch 8)."""
    from torch.utils.data import DataLoader

    from lora_sam3d.data import DataSettings, TS_SAM3D_Dataset, collate

    ds = TS_SAM3D_Dataset(
        root,
        HEART_CLASSES,
        split=None,
        augment=True,
        settings=DataSettings(preprocessing={"spacing_mm": 1.5}, views={"count": 3}),  # type: ignore[arg-type]
    )
    it = iter(DataLoader(ds, batch_size=8, shuffle=True, num_workers=workers, collate_fn=collate))
    next(it)  # workers started
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * 8 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 400))
    parser.add_argument("--data", help="a folder of such phantoms to reuse (written there when empty)")
    parser.add_argument("--json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lora-sam3d-cache-"))
    root = Path(args.data) if args.data else work / "data"
    if not (root / "s0002").is_dir():  # about 4 minutes and 14 GiB per case at the default size
        lora_sam3d("phantoms", "--root", str(root), "--n-cases", "2", "--shape", *map(str, args.shape),
                   "--spacing", "0.8", "0.8", "1.5")  # fmt: skip
    source = sum(folder_bytes(root / c) for c in ("s0001", "s0002")) / 2
    rows: list[dict[str, Any]] = []
    for workers in (1, 2):
        shutil.rmtree(root / ".cache", ignore_errors=True)
        seconds, peak = lora_sam3d(
            "cache", "--build", "--root", str(root), "--classes", *HEART_CLASSES, "--workers", str(workers)
        )
        rows.append(
            {"workers": workers, "seconds_per_case": seconds / 2, "wall_s": seconds, "peak_rss_bytes": peak}
        )
    cache = root / ".cache"
    labels = sorted(p for p in cache.iterdir() if p.is_dir() and p.name != "images")
    images = sorted((cache / "images").iterdir())
    meta = json.loads((labels[0] / "meta.json").read_text())
    voxels = int(np.prod(meta["shape"]))
    entry = {"labels_entry_bytes": folder_bytes(labels[0]), "image_entry_bytes": folder_bytes(images[0]),
             "grid": meta["shape"], "previous_format_bytes": voxels * (2 + 4) + folder_bytes(labels[0])
             - (labels[0] / "labels.npy").stat().st_size, "source_bytes": source}  # fmt: skip
    entry["case_bytes"] = entry["labels_entry_bytes"] + entry["image_entry_bytes"]
    entry["x_previous"] = entry["case_bytes"] / entry["previous_format_bytes"]
    print(f"one case ({args.shape[0]} x {args.shape[1]} x {args.shape[2]} at 0.8 x 0.8 x 1.5 mm; grid {meta['shape']} at 1.5 mm): "
          f"image entry {entry['image_entry_bytes'] / 2**20:.1f} MiB (the heart's frames' reach; shared by every class "
          f"list it holds), labels entry "
          f"{entry['labels_entry_bytes'] / 2**20:.2f} MiB, together {entry['case_bytes'] / 2**20:.1f} MiB = "
          f"{entry['x_previous']:.2f}x the previous format's {entry['previous_format_bytes'] / 2**20:.1f} MiB "
          f"(source NIfTI {source / 2**20:.1f} MiB)")  # fmt: skip
    for r in rows:
        peak = f"{r['peak_rss_bytes'] / 2**30:.2f} GiB"
        print(f"build with {r['workers']} worker(s): {r['seconds_per_case']:.1f} s per case ({r['wall_s']:.1f} s for 2), "
              f"peak memory of the largest process {peak}")  # fmt: skip
    rates = {w: loader_rate(root, w, 4) for w in (0, 2)}
    for w, rate in rates.items():
        print(f"DataLoader, {w} workers: {rate:.1f} training samples/s (3 views)")
    best = min(r["seconds_per_case"] for r in rows)
    full = {
        "hours_2_cores": TOTALSEGMENTATOR["cases"] * best / 3600,
        "image_gb": TOTALSEGMENTATOR["cases"] * entry["image_entry_bytes"] / 1e9,
        "previous_gb_per_class_list": TOTALSEGMENTATOR["cases"] * entry["previous_format_bytes"] / 1e9,
    }
    print(f"extrapolated to TotalSegmentator ({TOTALSEGMENTATOR['cases']} cases): {full['hours_2_cores']:.1f} h to build "
          f"on 2 cores, {full['image_gb']:.0f} GB of heart-reach images, plus each class list's labels (previous format: "
          f"{full['previous_gb_per_class_list']:.0f} GB per class list)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(
            json.dumps({"entry": entry, "build": rows, "loader": rates, "full": full}, indent=2)
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
