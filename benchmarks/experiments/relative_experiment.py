"""The scan read in absolute units against the scan read relative to the drawn tissue, on held-out
phantoms, on the same phantoms with their contrast changed, and on MR-like phantoms of the same
anatomy: does the scan help everywhere, and does a change of contrast leave the result alone?

Two adapters are trained from `configs/demo.yaml` (LoRA on ``builtin:scan_shapes``, the view mix,
the scan as context), one with ``data.context.reading: absolute`` (today's) and one with
``relative`` (`lora_sam3d.data.tissue`), on the demo's CT heart phantoms (``data/heart``). Each is
scored with ``lora-sam3d test`` on the held-out test split of four data sets that share the
anatomy: the CT phantoms as written; their images at ``0.6 I + 40`` HU; their images inverted
(``-I``, clipped by the CT window); and MR-like phantoms of the same seeds (``phantoms --modality
mr``: tissue intensities drawn per case, bias field, Rician noise), which the relative adapter reads
with ``--data.preprocessing.modality mr`` (percentile scaling) and the absolute one, whose units are
Hounsfield units, through its CT window as stored. Inputs: one slice, three orthogonal, 10 and 20
mm axial stacks; each with the scan and from the slices alone. A third variant, ``current``, is
`configs/demo.yaml` as committed (relative reading on the ``builtin:relative_shapes`` base, which
was pretrained with the relative reading on CT-like and MR-like phantoms and reads the slices'
interpolation); it reads every data set with ``modality: auto``. Writes
``docs/relative_experiment.json`` (rows of earlier runs are kept) and ``docs/relative_dice.png``;
prints a Markdown table.

    python benchmarks/experiments/relative_experiment.py [--out outputs/relative_experiment] [--readings absolute relative current]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import yaml
from experiment import cli, merge
from views_experiment import scores

from lora_sam3d.data import write_phantoms

ROOT = Path(__file__).resolve().parents[2]
INPUTS: dict[str, list[str]] = {
    "1 slice": ["--data.views.count", "1"],
    "3 orthogonal": ["--data.views.count", "3", "--data.views.layout", "orthogonal"],
    "stack 10 mm": ["--data.views.count", "16", "--data.views.layout", "stack", "--data.sampling.axes", "[2]",
                    "--data.views.spacing_mm", "10"],
    "stack 20 mm": ["--data.views.count", "16", "--data.views.layout", "stack", "--data.sampling.axes", "[2]",
                    "--data.views.spacing_mm", "20"],
}  # fmt: skip
READINGS = ("absolute", "relative", "current")
CONTRASTS = {"0.6 I + 40": (0.6, 40.0), "inverted": (-1.0, 0.0)}


def config(reading: str, out: Path) -> Path:
    """`configs/demo.yaml` writing under ``out/reading``, reading the scan as ``reading`` (on the
    ``builtin:scan_shapes`` base) or, for ``current``, as the demo config says."""
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    if reading != "current":  # the two readings of the first experiment, on the base it used
        cfg["model"]["base"] = {"checkpoint": "builtin:scan_shapes"}
        cfg["model"]["context"] = {"read": True, "conditioning": True}
        cfg["data"] = merge(cfg["data"], {"context": {"reading": reading}})
    run = out / reading
    cfg["trainer"]["default_root_dir"] = str(run)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(run)
    for cb in cfg["trainer"]["callbacks"]:
        args = cb.setdefault("init_args", {})
        if "dirpath" in args:
            args["dirpath"] = str(run / "checkpoints")
        if "output_dir" in args:
            args["output_dir"] = str(run / "predictions")
    path = out / f"{reading}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def data_sets(root: Path, out: Path) -> dict[str, tuple[Path, str]]:
    """Name -> (data root, modality) of the four data sets (written once under ``out/data``)."""
    sets = {"CT phantoms": (root, "ct")}
    for name, (a, b) in CONTRASTS.items():
        changed = out / "data" / name.replace(" ", "")
        if not (changed / "meta.csv").is_file():
            shutil.copytree(root, changed, ignore=shutil.ignore_patterns(".cache"), dirs_exist_ok=True)
            for image in changed.glob("s*/ct.nii.gz"):
                img = nib.load(image)
                data = np.asarray(img.dataobj, dtype=np.float32) * a + b
                nib.save(nib.Nifti1Image(np.round(data).astype(np.int16), img.affine), image)
        sets[f"CT, {name}"] = (changed, "ct")
    mr = out / "data" / "mr"
    if not (mr / "meta.csv").is_file():
        write_phantoms(mr, n_cases=20, modality="mr", workers=2)  # the demo's seeds: the same anatomy
    sets["MR-like phantoms"] = (mr, "mr")
    return sets


def evaluate(reading: str, cfg: Path, out: Path, sets: dict[str, tuple[Path, str]]) -> dict[str, Any]:
    ckpt = ["--ckpt_path", str(out / reading / "checkpoints" / "best.ckpt")]
    results: dict[str, Any] = {}
    for data_name, (root, modality) in sets.items():
        data = ["--data.root", str(root)]
        if reading == "current":
            data += ["--data.preprocessing.modality", "auto"]
        elif modality == "mr" and reading == "relative":
            data += ["--data.preprocessing.modality", "mr"]
        for name, flags in INPUTS.items():
            for context in ("volume", "none"):
                cli("test", "--config", str(cfg), *ckpt, *data, *flags, "--data.context.source", context)
                key = f"{data_name} | {name}, {'scan' if context == 'volume' else 'slices only'}"
                results[key] = scores(out / reading)
                print(key, f"{results[key]['dice']:.3f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="outputs/relative_experiment")
    parser.add_argument("--data", default="data/heart")
    parser.add_argument("--readings", nargs="+", default=list(READINGS), choices=READINGS)
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    docs = ROOT / "docs" / "relative_experiment.json"
    results: dict[str, Any] = json.loads(docs.read_text()) if docs.is_file() else {}
    root = ROOT / args.data
    for reading in args.readings:
        cfg = config(reading, out)
        if not (out / reading / "checkpoints" / "best.ckpt").is_file():
            cli("fit", "--config", str(cfg))  # writes data/heart's phantoms first when it is empty
        sets = data_sets(root, out)
        results[reading] = evaluate(reading, cfg, out, sets)
        docs.write_text(json.dumps(results, indent=2))  # after each reading: a long run keeps its rows
    plot(results, ROOT / "docs" / "relative_dice.png")
    print_table(results)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(k.split(" | ")[0] for r in results.values() for k in r))
    fig, axes = plt.subplots(1, len(sets), figsize=(3.2 * len(sets), 3.6), dpi=120, sharey=True)
    for ax, data_name in zip(np.atleast_1d(axes), sets, strict=True):
        for reading, rows in sorted(results.items()):
            for context, style in (("scan", "-o"), ("slices only", ":x")):
                ys = [rows.get(f"{data_name} | {name}, {context}", {}).get("dice", np.nan) for name in INPUTS]
                ax.plot(range(len(INPUTS)), ys, style, label=f"{reading}, {context}")
        ax.set_xticks(range(len(INPUTS)), list(INPUTS), fontsize=7)
        ax.set_title(data_name, fontsize=9)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("test Dice (5 heart structures)")
    np.atleast_1d(axes)[-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)


def print_table(results: dict[str, Any]) -> None:
    readings = sorted(results)
    print("| data | input | " + " | ".join(f"{r} Dice / HD95" for r in readings) + " |")
    print("|---|---|" + "---|" * len(readings))
    keys = list(dict.fromkeys(k for r in readings for k in results[r]))
    for key in keys:
        data_name, setting = key.split(" | ")
        cells = []
        for r in readings:
            v = results[r].get(key)
            cells.append(f"{v['dice']:.3f} / {v['hd95_mm']:.1f}" if v else "-")
        print(f"| {data_name} | {setting} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
