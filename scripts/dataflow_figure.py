"""Draw docs/dataflow.png: the README's picture of the data flow and the module behind each step.

.venv/bin/python scripts/dataflow_figure.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

STEPS = [
    (
        "scan + labels,\nor a request\n(NIfTI, PNG)",
        "data/nifti.py\ndata/volume.py\ndata/requests/",
        "#dbe9f6",
    ),
    (
        "slices + masks\ncut in the frame\n(1-16 views)",
        "data/sample.py\ndata/views.py\ndata/frame.py",
        "#dbe9f6",
    ),
    ("Evidence\n(typed batch)", "inputs.py", "#fde8c8"),
    ("stage 1:\noccupancy and\nlatents on R^3", "models/latent.py\nmodels/structure.py", "#e2f0d9"),
    ("active band\naround stage 1's\nsurface", "models/\nreconstructor.py", "#e2f0d9"),
    ("SAM 3D mesh\ndecoder + LoRA,\nto (4R)^3 cells", "models/decoder.py\nlora/\nsparse/", "#e2f0d9"),
    ("vertex SDF ->\nmesh in world\nRAS mm", "models/mesh.py\ngeometry.py", "#e2f0d9"),
    (
        "mesh, NIfTI\nmask, metrics,\nreport.html",
        "predict/\nmetrics.py\n(training/ fits)",
        "#f3dde8",
    ),
]


def main() -> None:
    fig, ax = plt.subplots(figsize=(17, 3.6), dpi=110)
    ax.set_xlim(0, len(STEPS) * 2)
    ax.set_ylim(-0.2, 3.4)
    ax.axis("off")
    for i, (what, where, colour) in enumerate(STEPS):
        x = i * 2 + 0.1
        box = FancyBboxPatch((x, 1.3), 1.7, 1.5, boxstyle="round,pad=0.05", fc=colour, ec="#555555")
        ax.add_patch(box)
        ax.text(x + 0.85, 2.05, what, ha="center", va="center", fontsize=10)
        ax.text(
            x + 0.85, 0.7, where, ha="center", va="center", fontsize=8.5, family="monospace", color="#333333"
        )
        if i:
            ax.add_patch(
                FancyArrowPatch((x - 0.25, 2.05), (x - 0.02, 2.05), arrowstyle="-|>", mutation_scale=14)
            )
    ax.text(0.1, 3.2, "data (lora_sam3d/data/)", fontsize=10, color="#2b5d8c")
    ax.text(
        6.1,
        3.2,
        "model: plain PyTorch (lora_sam3d/models/), LoRA on both stages",
        fontsize=10,
        color="#3b6e2b",
    )
    ax.text(14.1, 3.2, "predict/, training/ (Lightning)", fontsize=10, color="#8c2b5d")
    out = Path(__file__).resolve().parents[1] / "docs" / "dataflow.png"
    fig.savefig(out, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
