"""Open a report.html of many samples in headless Chromium: screenshot and console log.

Browsers keep about 16 WebGL contexts alive; a page with one 3D plot per sample loses the oldest
past that. The report draws every sample in one viewer, so its console must hold no "Too many
active WebGL contexts" and no lost context, however many samples it lists. By default it writes a
report of ``--samples`` synthetic ellipsoids (distinct sizes, with a "truth" beside each) and opens
it; ``--report`` opens an existing page instead (e.g. the demo's predictions/report.html).

    apt-get install chromium   # Debian's package
    python benchmarks/report_in_browser.py --samples 60 --out outputs/report-check
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

from lora_sam3d.geometry import marching_cubes
from lora_sam3d.predict.report import ReportSample, write_report


def ellipsoid(radii: tuple[float, float, float]) -> np.ndarray:
    axis = np.linspace(-1, 1, 33)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    return np.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2) - 1


def synthetic_report(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    frame = np.diag([80.0, 80.0, 80.0, 1.0])
    samples = []
    for i in range(n):
        radii = tuple(rng.uniform(0.3, 0.8, 3))
        mesh = marching_cubes(ellipsoid(radii)).to_world(frame)
        truth = marching_cubes(ellipsoid(tuple(r * 1.05 for r in radii))).to_world(frame)
        image = rng.random((64, 64))
        mask = np.zeros((64, 64), bool)
        mask[20:44, 18 + i % 10 : 40 + i % 10] = True
        metrics = {"dice": float(rng.uniform(0.6, 0.95)), "hd95_mm": float(rng.uniform(2, 9)),
                   "assd_mm": 1.0, "nsd": 0.8, "chamfer_mm": 2.0}  # fmt: skip
        samples.append(ReportSample(f"case{i:03d}_heart_ventricle_left_axial{30 + i}", f"case{i:03d}",
                                    "heart_ventricle_left", f"axial{30 + i}", mesh, image, mask, truth, metrics))  # fmt: skip
    return write_report(path, samples, f"report check ({n} samples)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--report", type=Path, help="an existing report.html (default: write a synthetic one)"
    )
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("outputs/report-check"))
    parser.add_argument("--fragment", default="", help="open the page at #<sample stem> (picks that sample)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    page = args.report or synthetic_report(args.out / "report.html", args.samples)
    shot = args.out / "screenshot.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
           "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={args.out / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--window-size=1400,2400", "--virtual-time-budget=15000", f"--screenshot={shot}",
           f"file://{page.resolve()}" + (f"#{args.fragment}" if args.fragment else "")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    log = done.stderr
    (args.out / "console.log").write_text(log)
    lost = ("Too many active WebGL contexts", "CONTEXT_LOST", "context lost", "Uncaught")
    bad = [line for line in log.splitlines() if any(word in line for word in lost)]
    contexts = {part.split("]")[0] for part in log.split("[.WebGL-")[1:]}
    print(f"page {page}; screenshot {shot} ({shot.stat().st_size if shot.exists() else 0} bytes)")
    print(f"WebGL contexts seen in the log: {len(contexts)}; lost contexts or uncaught errors: {len(bad)}")
    for line in bad[:20]:
        print("  " + line[:300])
    sys.exit(1 if bad or not shot.exists() else 0)


if __name__ == "__main__":
    main()
