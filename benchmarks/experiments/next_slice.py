"""Where to draw next, measured: does drawing the slice `where_to_draw` names raise Dice more than
drawing the structure's central slice on another axis, or a random slice through it?

Held-out phantom cases (the data root's val and test splits), every class. Round 1 starts from the
structure's central axial file slice; round 2 from that and the central sagittal one. After each
start the result names a slice; the truth's mask on that slice is added to the drawing and the
structure reconstructed again. Against it, in the same run: each central slice on an axis not yet
drawn, and three random slices through the structure (any axis, seeded). Printed: mean Dice of the
start and after each choice, and how often the named slice beats each alternative.

    python benchmarks/experiments/next_slice.py --root data/heart \
        --adapter outputs/demo/checkpoints/adapter-best --json docs/next_slice.json
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

import lora_sam3d
from lora_sam3d.data.cases import read_meta_splits
from lora_sam3d.data.requests.items import file_axis
from lora_sam3d.predict.next_slice import where_to_draw


def central(truth: np.ndarray, axis: int) -> int:
    return int(np.flatnonzero(truth.any(axis=tuple(b for b in range(3) if b != axis))).mean())


def painted(truth: np.ndarray, planes: list[tuple[int, int]]) -> np.ndarray:
    out = np.zeros(truth.shape, dtype=np.uint8)
    for axis, index in planes:
        take: list[Any] = [slice(None)] * 3
        take[axis] = index
        out[tuple(take)] = truth[tuple(take)]
    return out


def one_structure(
    session: lora_sam3d.Session,
    truth: np.ndarray,
    name: str,
    start: list[tuple[int, int]],
    rng: np.random.Generator,
) -> dict[str, Any]:
    def dice(planes: list[tuple[int, int]]) -> tuple[float, Any]:
        result = session.reconstruct(painted(truth, planes), name, truth=truth)
        return float(result.prediction.metrics["dice"]), result

    base, result = dice(start)
    affine = result.mask.affine
    named = where_to_draw(np.asarray(result.mask.dataobj), affine, result.slices)
    assert named is not None
    suggested = (file_axis(affine, named["axis"]), named["index"])
    out: dict[str, Any] = {
        "class": name,
        "start": base,
        "named": named,
        "suggested": dice([*start, suggested])[0],
    }
    drawn_axes = {a for a, _ in start}
    out["central"] = {
        f"axis {a}": dice([*start, (a, central(truth, a))])[0] for a in range(3) if a not in drawn_axes
    }
    randoms = []
    for _ in range(3):  # any axis; not on or beside a drawn slice (neighbours would read as one stroke)
        a = int(rng.integers(3))
        through = np.flatnonzero(truth.any(axis=tuple(b for b in range(3) if b != a)))
        through = [i for i in through if all(b != a or abs(i - j) > 1 for b, j in start)]
        randoms.append(dice([*start, (a, int(rng.choice(through)))])[0])
    out["random"] = randoms
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="data/heart")
    parser.add_argument("--adapter", default="outputs/demo/checkpoints/adapter-best")
    parser.add_argument("--splits", nargs="+", default=["val", "test"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    root = Path(args.root)
    cases = [case for case, split in read_meta_splits(root).items() if split in args.splits]
    model = lora_sam3d.load_model(args.adapter)
    classes = model.data_contract["classes"]
    rng = np.random.default_rng(args.seed)
    rows: dict[str, list[dict[str, Any]]] = {"round 1 (axial)": [], "round 2 (axial + sagittal)": []}
    for case in cases:
        scan = root / case / "ct.nii.gz"
        affine = nib.load(scan).affine
        with lora_sam3d.Session(model, scan) as session:
            for name in classes:
                truth = np.asarray(nib.load(root / case / "segmentations" / f"{name}.nii.gz").dataobj) > 0
                z, x = file_axis(affine, "axial"), file_axis(affine, "sagittal")
                for label, start in (
                    ("round 1 (axial)", [(z, central(truth, z))]),
                    ("round 2 (axial + sagittal)", [(z, central(truth, z)), (x, central(truth, x))]),
                ):
                    row = one_structure(session, truth, name, start, rng)
                    rows[label].append({"case": case, **row})
                    print(case, label, name, f"start {row['start']:.3f} suggested {row['suggested']:.3f}",
                          "central", {k: round(v, 3) for k, v in row["central"].items()},
                          "random", [round(v, 3) for v in row["random"]], row["named"])  # fmt: skip
    summary = {}
    for label, found in rows.items():
        central_mean = [float(np.mean(list(r["central"].values()))) for r in found]
        central_best = [max(r["central"].values()) for r in found]
        random_mean = [float(np.mean(r["random"])) for r in found]
        suggested = [r["suggested"] for r in found]
        summary[label] = {
            "requests": len(found),
            "start": float(np.mean([r["start"] for r in found])),
            "suggested": float(np.mean(suggested)),
            "central, other axes (mean)": float(np.mean(central_mean)),
            "central, the better other axis": float(np.mean(central_best)),
            "random through it (mean of 3)": float(np.mean(random_mean)),
            "suggested beats central (mean)": float(np.mean(np.array(suggested) > np.array(central_mean))),
            "suggested beats random (mean)": float(np.mean(np.array(suggested) > np.array(random_mean))),
        }
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
