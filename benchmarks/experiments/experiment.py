"""The demo experiment: no adaptation vs LoRA variants vs full fine-tuning vs two baselines, through the CLI.

Every variant starts from `configs/demo.yaml` (shipped base `builtin:shapes`, heart phantoms) with
only the settings below changed; each is trained with `lora-sam3d fit` and scored with
`lora-sam3d test` on the held-out test cases (split by case), on each scan's own voxel grid.
Baselines with the same data, epochs and scoring: (f) this architecture trained fully from a
random init, (g) a plain dense 3D CNN (`benchmarks/experiments/plain_cnn.py`) from the same slice evidence. Writes `docs/experiment.json`,
`docs/experiment_dice.png` (validation Dice against step) and `docs/experiment_meshes.png`
(predicted vs true surfaces for one test case), and prints a Markdown table. Each variant's
per-sample test Dice (from `lora-sam3d predict` on the test split) is paired with the base's on
the same samples: the mean gain comes with a 95% interval from a bootstrap over test *cases*
(samples of one case are not independent), and the share of samples that improved.

    python benchmarks/experiments/experiment.py [--variants a b c d e] [--out outputs/experiment]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
VARIANTS: dict[str, dict[str, Any]] = {
    "a": {"name": "(a) base, no adaptation", "model": {}, "train": False},
    "b": {"name": "(b) LoRA r=4 on to_qkv+to_out", "model": {}},
    "c": {
        "name": "(c) LoRA r=4 on q,v only",
        "model": {"finetune": {"lora": {"target_modules": ["to_qkv"], "qkv_slices": ["q", "v"]}}},
    },
    "d": {
        "name": "(d) full fine-tuning",
        "model": {"finetune": {"mode": "full"}, "optimizer": {"init_args": {"lr": 0.001}}},
    },
    "e": {
        "name": "(e) LoRA r=16 on to_qkv+to_out",
        "model": {"finetune": {"lora": {"rank": 16, "alpha": 32}}},
    },
    "f": {
        "name": "(f) from scratch, same budget (full training, random init)",
        "model": {
            "base": {"checkpoint": None},
            "finetune": {"mode": "full"},
            "optimizer": {"init_args": {"lr": 0.002}},
        },
    },
    "g": {
        "name": "(g) plain dense 3D CNN on 32^3 cells, same budget",
        "model": {
            "base": {"checkpoint": None},
            "finetune": {"mode": "full"},
            "decoder": {"resolution": 8},
            "optimizer": {"init_args": {"lr": 0.002}},
        },
        "runner": "benchmarks/experiments/plain_cnn.py",
    },
    "h": {
        "name": "(h) LoRA on the decoder, stage 1 trained fully",
        "model": {"finetune": {"structure_mode": "full"}},
    },
    "i": {
        "name": "(i) LoRA, decoder trained on predicted active sets only",
        "model": {"band": {"train_on": "predicted"}},
    },
}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def variant_config(key: str, out: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    run = out / key
    cfg["trainer"]["default_root_dir"] = str(run)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(run)
    for cb in cfg["trainer"]["callbacks"]:
        args = cb.setdefault("init_args", {})
        if "dirpath" in args:
            args["dirpath"] = str(run / "checkpoints")
        if "output_dir" in args:
            args["output_dir"] = str(run / "predictions")
    cfg["model"] = merge(cfg["model"], VARIANTS[key]["model"])
    path = out / f"{key}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cli(*args: str, runner: str | None = None) -> float:
    start = time.perf_counter()
    venv = ROOT / ".venv" / "bin"
    cmd = [str(venv / "python"), runner, *args] if runner else [str(venv / "lora-sam3d"), *args]
    print(f"$ {runner or 'lora-sam3d'} " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def metrics_rows(run: Path) -> list[list[dict[str, str]]]:
    files = sorted(
        (run / "lightning_logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])
    )
    return [list(csv.DictReader(f.open())) for f in files]


def last_value(rows: list[dict[str, str]], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return values[-1] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="outputs/experiment")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    results = []
    curves: dict[str, list[tuple[int, float]]] = {}
    per_sample: dict[str, dict[tuple[str, ...], float]] = {}
    for key in args.variants:
        cfg = variant_config(key, out)
        run = out / key
        rel = cfg.relative_to(ROOT) if cfg.is_relative_to(ROOT) else cfg
        summary: dict[str, Any] = {}
        runner = VARIANTS[key].get("runner")
        if VARIANTS[key].get("train", True):
            cli("fit", "--config", str(rel), runner=runner)
            summary = json.loads((run / "checkpoints" / "run_summary.json").read_text())
            best = ("--ckpt_path", str(run / "checkpoints" / "best.ckpt"))
            cli("test", "--config", str(rel), *best, runner=runner)
            cli("predict", "--config", str(rel), *best, runner=runner)
            program = f"python {runner}" if runner else "lora-sam3d"
            command = f"{program} fit --config configs/demo.yaml {flags(VARIANTS[key]['model'])}".strip()
        else:
            cli("validate", "--config", str(rel))
            cli("test", "--config", str(rel))
            cli("predict", "--config", str(rel))
            command = "lora-sam3d test --config configs/demo.yaml"
        per_sample[key] = sample_dice(run / "predictions" / "metrics.csv")
        logs = metrics_rows(run)
        test_rows = logs[-1]
        if VARIANTS[key].get("train", True):
            curves[key] = [(int(r["step"]), float(r["val/dice"])) for r in logs[-2] if r.get("val/dice")]
        else:
            curves[key] = [(0, last_value(logs[-2], "val/dice"))]
        classes = sorted({k.split("/")[-1] for r in test_rows for k in r if k.startswith("test/dice/")})
        ckpt = run / "checkpoints" / "best.ckpt"
        adapter = summary.get("adapter_bytes")
        if adapter is None and ckpt.is_file():
            import torch

            state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
            adapter = sum(v.numel() * v.element_size() for v in state.values())
        results.append({
            "name": VARIANTS[key]["name"],
            "mean_dice": last_value(test_rows, "test/dice"),
            "mean_hd95_mm": last_value(test_rows, "test/hd95_mm"),
            "mean_assd_mm": last_value(test_rows, "test/assd_mm"),
            "mean_nsd": last_value(test_rows, "test/nsd"),
            "mean_chamfer_mm": last_value(test_rows, "test/chamfer_mm"),
            "dice_per_class": {c: last_value(test_rows, f"test/dice/{c}") for c in classes},
            "failures": sum(last_value(test_rows, f"test/failures/{c}") for c in classes),
            "trainable_params": summary.get("trainable_params", 0),
            "adapter_bytes": adapter or 0,
            "train_seconds": summary.get("train_seconds", 0.0),
            "peak_mem_bytes": summary.get("peak_rss_bytes"),
            "command": command,
        })  # fmt: skip
        if key != "a" and "a" in per_sample:
            results[-1].update(paired_gain(per_sample[key], per_sample["a"]))
        print(json.dumps(results[-1], indent=2), flush=True)
    docs = ROOT / "docs"
    previous = (
        json.loads((docs / "experiment.json").read_text()) if (docs / "experiment.json").is_file() else []
    )
    names = {r["name"] for r in results}  # a partial rerun (--variants) keeps the other rows
    results = [
        r
        for r in previous
        if r.get("name") not in names and r.get("name", "")[:3] in {v["name"][:3] for v in VARIANTS.values()}
    ] + results
    results.sort(key=lambda r: r["name"])
    (docs / "experiment.json").write_text(json.dumps(results, indent=2))
    plot_curves(curves, docs / "experiment_dice.png")
    if "b" in args.variants:
        plot_meshes(out / "b" / "predictions", docs / "experiment_meshes.png")
    print_table(results)


def sample_dice(metrics_csv: Path) -> dict[tuple[str, ...], float]:
    """(case, class, axis, index) -> Dice of one predicted test sample."""
    with metrics_csv.open() as f:
        return {
            (r["case_id"], r["class_name"], r["axis"], r.get("grid_index", r.get("index"))): float(r["dice"])
            for r in csv.DictReader(f)
        }


def paired_gain(
    variant: dict[tuple[str, ...], float], base: dict[tuple[str, ...], float], draws: int = 10_000
) -> dict[str, Any]:
    """Mean per-sample Dice gain over the base with a 95% bootstrap interval over test cases."""
    keys = sorted(variant.keys() & base.keys())
    cases = sorted({k[0] for k in keys})
    diffs = {c: np.array([variant[k] - base[k] for k in keys if k[0] == c]) for c in cases}
    rng = np.random.default_rng(0)
    means = []
    for _ in range(draws):
        pick = rng.choice(len(cases), len(cases))
        means.append(np.concatenate([diffs[cases[i]] for i in pick]).mean())
    all_diffs = np.concatenate(list(diffs.values()))
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "dice_gain_over_base": float(all_diffs.mean()),
        "dice_gain_ci95": [float(low), float(high)],
        "samples_improved": f"{int((all_diffs > 0).sum())}/{len(all_diffs)}",
        "paired_samples": len(all_diffs),
        "test_cases": len(cases),
    }


def flags(model: dict[str, Any], prefix: str = "--model.") -> str:
    parts = []
    for k, v in model.items():
        if isinstance(v, dict):
            parts.append(flags(v, f"{prefix}{k}."))
        else:
            parts.append(f"{prefix}{k} {json.dumps(v).replace(' ', '')}")
    return " ".join(parts)


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    longest = max((c[-1][0] for c in curves.values() if c), default=1)
    for key, points in curves.items():
        if key not in "abcd":
            continue
        if len(points) == 1:
            ax.hlines(
                points[0][1], 0, longest, linestyles="dashed", colors="gray", label=VARIANTS[key]["name"]
            )
        else:
            steps, dice = zip(*points, strict=True)
            ax.plot(steps, dice, marker="o", label=VARIANTS[key]["name"])
    ax.set_xlabel("training step")
    ax.set_ylabel("validation Dice (mean over 5 heart structures)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def plot_meshes(predictions: Path, path: Path, inputs: str = "one axial slice each") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import trimesh

    rows = list(csv.DictReader((predictions / "metrics.csv").open()))
    case = rows[0]["case_id"]
    picks = [r for r in rows if r["case_id"] == case and r["axis"] == "2"]
    fig = plt.figure(figsize=(3.2 * len(picks), 3.6), dpi=110)
    for i, row in enumerate(picks):
        slice_name = row.get("slice") or "axis{axis}_slice{index}".format(**row)
        stem = f"{row['case_id']}_{row['class_name']}_{slice_name}"
        ax = fig.add_subplot(1, len(picks), i + 1, projection="3d")
        mesh = trimesh.load(predictions / f"{stem}.ply", process=False)
        v, f = np.asarray(mesh.vertices), np.asarray(mesh.faces)
        ax.plot_trisurf(v[:, 0], v[:, 1], v[:, 2], triangles=f, color=(0.9, 0.2, 0.2, 0.35), linewidth=0)
        gt = (
            trimesh.load(predictions / f"{stem}_truth.ply", process=False)
            if (predictions / f"{stem}_truth.ply").is_file()
            else None
        )
        if gt is not None:
            g, gf = np.asarray(gt.vertices), np.asarray(gt.faces)
            ax.plot_trisurf(g[:, 0], g[:, 1], g[:, 2], triangles=gf, color=(0.2, 0.7, 0.2, 0.25), linewidth=0)
        ax.set_title(f"{row['class_name'].replace('heart_', '')}\nDice {float(row['dice']):.2f}", fontsize=8)
        ax.set_axis_off()
    fig.tight_layout(rect=(0, 0.07, 1, 0.9))
    caption = f"{case}: predicted (red) vs true (green) surfaces, RAS mm, from {inputs}"
    fig.text(0.5, 0.02, caption, ha="center", fontsize=9)
    fig.savefig(path)


def print_table(results: list[dict[str, Any]]) -> None:
    print("| variant | Dice gain over (a) | 95% interval (bootstrap over cases) | samples improved |")
    print("|---|---|---|---|")
    for r in results:
        if "dice_gain_over_base" in r:
            low, high = r["dice_gain_ci95"]
            print(
                f"| {r['name']} | {r['dice_gain_over_base']:+.3f} | [{low:+.3f}, {high:+.3f}] | {r['samples_improved']} |"
            )
    print()
    print(
        "| variant | mean Dice | HD95 mm | ASSD mm | NSD@3mm | Chamfer mm | trainable params | adapter bytes | train s | peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        peak = r["peak_mem_bytes"] / 2**20 if r["peak_mem_bytes"] else float("nan")
        print(f"| {r['name']} | {r['mean_dice']:.3f} | {r['mean_hd95_mm']:.2f} | {r['mean_assd_mm']:.2f} | {r['mean_nsd']:.3f} | "
              f"{r['mean_chamfer_mm']:.2f} | {r['trainable_params']:,} | {r['adapter_bytes']:,} | {r['train_seconds']:.0f} | {peak:.0f} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
