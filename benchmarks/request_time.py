"""One request on a real-size CT: `lora_sam3d.reconstruct` from files, its time split into load,
frame, model, mask and scores, for this checkout and for an earlier commit, in one run.

The scan is a heart phantom resampled to 512 x 512 x 300 voxels (about 0.30 x 0.30 x 0.53 mm, as
real CTs are 512 x 512 x 300-1000), with its left ventricle's 3D mask as the request's mask (so
the request is scored). Each side runs in its own process on the same files (the earlier commit
from a temporary git worktree), one warm-up call then ``--repeats`` timed calls; the split comes
from one more call under cProfile (cumulative seconds of the functions each stage is made of).

    python benchmarks/request_time.py --adapter outputs/demo/checkpoints/adapter-best --baseline eaee8b2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASS = "heart_ventricle_left"
SHAPE = (512, 512, 300)

# The stages, as the functions they are made of (matched by name in the profile; both versions).
STAGES = {
    "check": ("_check",),  # the request checked when the dataset is built (its slices, the scan's values)
    "load": ("load_volume",),  # the scan and the slice masks on the model's grid
    "item": ("__getitem__",),  # load, then the frame, the views, the scan as context and the truth
    "model": ("forward",),
    "scores": ("score_batch",),
    "mask": ("mask_on_source_grid",),
}


def make_scan(folder: Path) -> tuple[Path, Path, int]:
    """A heart phantom at real CT size: (scan, its left ventricle's mask, the mask's central axial slice)."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    from lora_sam3d.data.phantoms import write_phantoms

    write_phantoms(folder / "small", n_cases=1, seed=7)
    case = next(p for p in (folder / "small").iterdir() if p.is_dir())
    ct, lv = nib.load(str(case / "ct.nii.gz")), nib.load(str(case / "segmentations" / f"{CLASS}.nii.gz"))
    zoom = [n / s for n, s in zip(SHAPE, ct.shape, strict=True)]
    affine = ct.affine.copy()
    affine[:3, :3] = ct.affine[:3, :3] / np.asarray(zoom)
    affine[:3, 3] = ct.affine[:3, 3] + ct.affine[:3, :3] @ ((1 / np.asarray(zoom) - 1) / 2)
    image = ndimage.zoom(np.asarray(ct.dataobj, dtype=np.float32), zoom, order=1).round().astype(np.int16)
    mask = ndimage.zoom(np.asarray(lv.dataobj, dtype=np.uint8), zoom, order=0)
    scan, label = folder / "big" / "ct.nii.gz", folder / "big" / f"{CLASS}.nii.gz"
    scan.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(image, affine), scan)
    nib.save(nib.Nifti1Image(mask, affine), label)
    index = int(np.round(np.argwhere(mask)[:, 2].mean()))
    return scan, label, index


def worker(adapter: str, scan: str, mask: str, index: int, repeats: int) -> dict[str, object]:
    """Time `reconstruct` in this process (whatever lora_sam3d the path gives) and split one call."""
    import cProfile
    import pstats
    import time

    import numpy as np

    import lora_sam3d
    from lora_sam3d.models import Reconstructor

    module = Reconstructor.from_adapter(adapter)  # an adapter folder: both versions read it

    def call() -> object:
        return lora_sam3d.reconstruct(module, scan, mask, CLASS, axis="axial", index=index)

    result = call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    profile = cProfile.Profile()
    profile.runcall(call)
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    split = {
        stage: max(
            (s[3] for (file, _, name), s in stats.items() if name in names and "lora_sam3d" in file),
            default=0.0,
        )
        for stage, names in STAGES.items()
    }
    metrics = result.prediction.metrics or {}  # type: ignore[attr-defined]
    written = np.asarray(result.mask.dataobj) > 0  # type: ignore[attr-defined]
    return {
        "median_s": float(np.median(times)),
        "times_s": times,
        "split_s": split,
        "dice": metrics.get("dice"),
        "hd95_mm": metrics.get("hd95_mm"),
        "mask_voxels": int(written.sum()),
        "lora_sam3d": str(Path(lora_sam3d.__file__).parent),
    }


def run_side(source: Path, args: argparse.Namespace, scan: Path, mask: Path, index: int) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(source))
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        str(args.adapter),
        str(scan),
        str(mask),
        str(index),
        str(args.repeats),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=source)
    if done.returncode:
        raise RuntimeError(f"{source}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        adapter, scan, mask, index, repeats = sys.argv[2:7]
        print(json.dumps(worker(adapter, scan, mask, int(index), int(repeats))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--adapter", type=Path, default=ROOT / "outputs" / "demo" / "checkpoints" / "adapter-best",
        help="an adapter folder (the demo's by default): both versions read it",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", default="eaee8b2", help="the earlier commit to time beside this checkout"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.adapter / "model.json").is_file():
        sys.exit(f"no adapter folder {args.adapter}: run the demo (README) or give --adapter")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        scan, mask, index = make_scan(folder)
        print(f"scan {scan.name}: {SHAPE} voxels, mask {CLASS}, axial slice {index}", flush=True)
        worktree = folder / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(worktree), args.baseline],
                       check=True)  # fmt: skip
        try:
            before = run_side(worktree, args, scan, mask, index)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False
            )
        after = run_side(ROOT, args, scan, mask, index)
    print(
        f"\none request on a {SHAPE[0]} x {SHAPE[1]} x {SHAPE[2]} CT (median of {args.repeats} after a warm-up)"
    )
    print(f"{'':18s} {args.baseline:>12s} {'this checkout':>14s} {'ratio':>7s}")
    rows = [("total", before["median_s"], after["median_s"])]
    for side in (before, after):  # the frame and inputs: the dataset item less its loading
        side["split_s"]["frame"] = side["split_s"]["item"] - side["split_s"]["load"]  # type: ignore[index]
    names = ["check", "load", "frame", "model", "scores", "mask"]
    rows += [(f"  {k}", before["split_s"][k], after["split_s"][k]) for k in names]  # type: ignore[index]
    for name, b, a in rows:
        print(f"{name:18s} {b:11.2f}s {a:13.2f}s {b / a if a else float('nan'):6.1f}x")
    print(
        f"Dice {before['dice']:.6f} -> {after['dice']:.6f}; mask voxels {before['mask_voxels']} -> {after['mask_voxels']}"
    )
    print("(check: reading and checking the request as the dataset is built; load: the scan and masks on the")
    print(" model's grid; frame: the frame, views, context and truth; the split is one call under cProfile)")
    if args.json:
        args.json.write_text(
            json.dumps({"baseline": args.baseline, "before": before, "after": after}, indent=2)
        )


if __name__ == "__main__":
    main()
