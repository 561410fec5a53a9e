"""The scan as context and every slice: Dice, HD95 and NSD by input, with and without the scan, for
the base, LoRA, full fine-tuning, training from scratch and the plain dense 3D CNN, through the CLI,
beside ITK's morphological contour interpolation on the same stacks.

Each variant of `benchmarks/experiments/experiment.py` named below is trained once from `configs/demo.yaml`
(the view mix and the scan as context, blanked for a quarter of the training samples), then scored
with ``lora-sam3d test`` on the held-out test cases at every input of `INPUTS`, once reading the
scan (``--data.context.source volume``) and once from the slices alone (``none``); one checkpoint serves
all of them, the base is scored as shipped. Stacks are axial (``--data.sampling.axes [2]``), through each
structure's central slice, as `benchmarks/experiments/fill_between_slices.py` keeps the file's slices for ITK.
Scores are on each scan's own grid. Writes ``docs/context_experiment.json`` and
``docs/context_dice.png`` (test Dice against the number of slices) and prints Markdown tables.

    python benchmarks/experiments/context_experiment.py [--variants a b d f g] [--out outputs/context_experiment]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from experiment import VARIANTS, cli
from fill_between_slices import score as itk_score
from views_experiment import CLASS_SHORT, scores, train_variant

ROOT = Path(__file__).resolve().parents[2]
STACK = [
    "--data.views.count",
    "16",
    "--data.views.layout",
    "stack",
    "--data.sampling.axes",
    "[2]",
    "--data.views.spacing_mm",
]
INPUTS: dict[str, list[str]] = {
    "1 slice": ["--data.views.count", "1"],
    "3 orthogonal": ["--data.views.count", "3", "--data.views.layout", "orthogonal"],
    "stack 10 mm": [*STACK, "10"],
    "stack 20 mm": [*STACK, "20"],
    "3 parallel 10 mm": [
        "--data.views.count",
        "3",
        "--data.views.layout",
        "parallel",
        "--data.views.spacing_mm",
        "10",
    ],
}
"""The inputs every variant is scored at (flags of ``lora-sam3d test``), each with and without context."""


def run_variant(key: str, out: Path) -> dict[str, Any]:
    cfg, runner, ckpt, summary = train_variant(key, out)
    by_input = {}
    for name, flags in INPUTS.items():
        for context in ("volume", "none"):
            cli("test", "--config", cfg, *ckpt, *flags, "--data.context.source", context, runner=runner)
            by_input[f"{name}, {'scan' if context == 'volume' else 'slices only'}"] = scores(out / key)
    return {
        "by_input": by_input,
        "trainable_params": summary.get("trainable_params", 0),
        "train_seconds": summary.get("train_seconds", 0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=["a", "b", "d", "f", "g"], choices=list(VARIANTS))
    parser.add_argument("--out", default="outputs/context_experiment")
    parser.add_argument("--data", default="data/heart")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    docs = ROOT / "docs" / "context_experiment.json"
    results: dict[str, Any] = json.loads(docs.read_text()) if docs.is_file() else {}
    for mm in (10.0, 20.0):  # what users would pick instead, on the same test cases' stacks
        results.setdefault("ITK fill between slices", {"by_input": {}})["by_input"][
            f"stack {mm:g} mm, slices only"
        ] = itk_score(ROOT / args.data, list(CLASS_SHORT), mm)
    for key in args.variants:
        results[VARIANTS[key]["name"]] = run_variant(key, out)
        print(json.dumps({VARIANTS[key]["name"]: results[VARIANTS[key]["name"]]}, indent=2), flush=True)
        docs.write_text(json.dumps(results, indent=2))  # after each variant: a long run keeps its rows
    docs.write_text(json.dumps(results, indent=2))
    plot(results, ROOT / "docs" / "context_dice.png")
    print_tables(results)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.0), dpi=120, sharey=True)
    itk = results.get("ITK fill between slices", {}).get("by_input", {})
    counts = {"1 slice": 1.0, "3 orthogonal": 3.0}  # a stack's count: the slices ITK kept on the same cases
    counts |= {
        f"stack {mm} mm": itk.get(f"stack {mm} mm, slices only", {}).get("slices_per_structure", 0)
        for mm in (10, 20)
    }
    for ax, context in zip(axes, ("scan", "slices only"), strict=True):
        for name, r in sorted(results.items()):
            points = []
            for setting, v in r["by_input"].items():
                base, _, reads = setting.partition(", ")
                if reads == context and base in counts:
                    points.append((counts[base], v.get("mean", v)["dice"]))
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, ys, marker="o", label=name[:48])
        ax.set_title(f"with {'the scan' if context == 'scan' else 'the slices only'}")
        ax.set_xlabel("input slices per structure (1, 3 orthogonal, stacks 20 / 10 mm)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test Dice (mean over 5 heart structures)")
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)


def print_tables(results: dict[str, Any]) -> None:
    print("| variant | input | mean Dice | HD95 mm | NSD@3mm | " + " | ".join(CLASS_SHORT.values()) + " |")
    print("|---|---|---|---|---|" + "---|" * len(CLASS_SHORT))
    for name, r in sorted(results.items()):
        for setting, v in r["by_input"].items():
            mean = v.get("mean", v)
            per = v.get("dice_per_class") or {c: v[c]["dice"] for c in CLASS_SHORT if c in v}
            cells = " | ".join(f"{per.get(c, float('nan')):.3f}" for c in CLASS_SHORT)
            print(
                f"| {name} | {setting} | {mean['dice']:.3f} | {mean['hd95_mm']:.2f} | {mean['nsd']:.3f} | {cells} |"
            )


if __name__ == "__main__":
    main()
