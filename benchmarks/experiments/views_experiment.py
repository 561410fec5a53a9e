"""Several views per sample: Dice, HD95 and NSD by the number of input slices, for the base, LoRA,
full fine-tuning, training from scratch and the plain dense 3D CNN, through the CLI.

Each variant of `benchmarks/experiments/experiment.py` named below is trained once from `configs/demo.yaml`
(which trains with ``data.views: 3``, ``view_layout: orthogonal``: each training sample draws 1, 2
or 3 views), then scored with ``lora-sam3d test`` on the held-out test cases at every view setting
of `SETTINGS` (one checkpoint serves all of them; the base is scored as shipped). Scores are on
each scan's own grid, per structure. Writes ``docs/views_experiment.json`` and
``docs/views_dice.png`` (test Dice against the number of views) and prints Markdown tables.

    python benchmarks/experiments/views_experiment.py [--variants a b d f g] [--out outputs/views_experiment]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from experiment import VARIANTS, cli, last_value, metrics_rows, variant_config

ROOT = Path(__file__).resolve().parents[2]
SETTINGS: dict[str, list[str]] = {
    "1 view": ["--data.views.count", "1"],
    "2 orthogonal": ["--data.views.count", "2", "--data.views.layout", "orthogonal"],
    "3 orthogonal": ["--data.views.count", "3", "--data.views.layout", "orthogonal"],
    "3 parallel, 10 mm": [
        "--data.views.count",
        "3",
        "--data.views.layout",
        "parallel",
        "--data.views.spacing_mm",
        "10",
    ],
}
"""The view settings every variant is scored at (flags of ``lora-sam3d test``)."""


def train_variant(key: str, out: Path) -> tuple[str, str | None, list[str], dict[str, Any]]:
    """Variant ``key``'s config under ``out``, trained once unless it is the base as shipped: (config,
    runner, the ``--ckpt_path`` flags to test it with, its run summary)."""
    variant = VARIANTS[key]
    cfg = str(variant_config(key, out))
    runner = variant.get("runner")
    if not variant.get("train", True):
        return cfg, runner, [], {}
    cli("fit", "--config", cfg, runner=runner)
    summary = json.loads((out / key / "checkpoints" / "run_summary.json").read_text())
    return cfg, runner, ["--ckpt_path", str(out / key / "checkpoints" / "best.ckpt")], summary


def scores(run: Path) -> dict[str, Any]:
    """The test metrics of the newest logged run in ``run``."""
    rows = metrics_rows(run)[-1]
    classes = sorted({k.split("/")[-1] for r in rows for k in r if k.startswith("test/dice/")})
    return {
        "dice": last_value(rows, "test/dice"),
        "hd95_mm": last_value(rows, "test/hd95_mm"),
        "nsd": last_value(rows, "test/nsd"),
        "dice_per_class": {c: last_value(rows, f"test/dice/{c}") for c in classes},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=["a", "b", "d", "f", "g"], choices=list(VARIANTS))
    parser.add_argument("--out", default="outputs/views_experiment")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    docs = ROOT / "docs" / "views_experiment.json"
    results: dict[str, Any] = json.loads(docs.read_text()) if docs.is_file() else {}
    for key in args.variants:
        variant = VARIANTS[key]
        cfg, runner, ckpt, summary = train_variant(key, out)
        by_views = {}
        for name, flags in SETTINGS.items():
            cli("test", "--config", cfg, *ckpt, *flags, runner=runner)
            by_views[name] = scores(out / key)
        results[variant["name"]] = {
            "by_views": by_views,
            "trainable_params": summary.get("trainable_params", 0),
            "train_seconds": summary.get("train_seconds", 0.0),
        }
        print(json.dumps({variant["name"]: results[variant["name"]]}, indent=2), flush=True)
        docs.write_text(json.dumps(results, indent=2))  # after each variant: a long run keeps its rows
    plot(results, ROOT / "docs" / "views_dice.png")
    print_tables(results)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    counts = {"1 view": 1, "2 orthogonal": 2, "3 orthogonal": 3}
    for name, r in sorted(results.items()):
        ax.plot(list(counts.values()), [r["by_views"][s]["dice"] for s in counts], marker="o", label=name)
        ax.scatter(
            [3.08], [r["by_views"]["3 parallel, 10 mm"]["dice"]], marker="x", color=ax.lines[-1].get_color()
        )
    ax.set_xticks([1, 2, 3], ["1", "2 (orthogonal)", "3 (orthogonal; x: parallel 10 mm)"])
    ax.set_xlabel("input slices per sample")
    ax.set_ylabel("test Dice (mean over 5 heart structures)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def print_tables(results: dict[str, Any]) -> None:
    print("| variant | views | mean Dice | HD95 mm | NSD@3mm | " + " | ".join(CLASS_SHORT.values()) + " |")
    print("|---|---|---|---|---|" + "---|" * len(CLASS_SHORT))
    for name, r in sorted(results.items()):
        for setting, v in r["by_views"].items():
            per = " | ".join(f"{v['dice_per_class'].get(c, float('nan')):.3f}" for c in CLASS_SHORT)
            print(f"| {name} | {setting} | {v['dice']:.3f} | {v['hd95_mm']:.2f} | {v['nsd']:.3f} | {per} |")


CLASS_SHORT = {
    "heart_myocardium": "myocardium",
    "heart_atrium_left": "atrium L",
    "heart_ventricle_left": "ventricle L",
    "heart_atrium_right": "atrium R",
    "heart_ventricle_right": "ventricle R",
}


if __name__ == "__main__":
    main()
