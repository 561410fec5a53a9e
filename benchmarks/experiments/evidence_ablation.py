"""What each part of the current demo's evidence gives, on the validation split (never the test
split): the demo's checkpoint as trained, then with one part taken away at inference, in one
process through Lightning's ``Trainer.validate``:

- the slices' interpolation read as zeros (what the model reads where no two slices bracket a cell),
- the drawing not given back (``drawing_width = 0``: the network's own surface),
- the band two cells wide at inference instead of one (does stage 1's band limit the decoder?).

Layouts: one slice, three orthogonal, an axial 10 mm stack, each with the scan. Writes
``docs/evidence_ablation.json`` and prints a Markdown table.

    python benchmarks/experiments/evidence_ablation.py --config configs/demo.yaml --ckpt outputs/demo/checkpoints/best.ckpt
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from drawing_experiment import layout_data

from lora_sam3d.models import latent
from lora_sam3d.training.module import LoRAMeshDecoderModule

ROOT = Path(__file__).resolve().parents[2]
INTERPOLATION = latent.shape_interpolation


def no_interpolation(*args: Any) -> torch.Tensor:
    """`latent.shape_interpolation` reading nothing anywhere (its value where no slices bracket a cell)."""
    return torch.zeros_like(INTERPOLATION(*args))


VARIANTS: dict[str, Callable[[LoRAMeshDecoderModule], None]] = {
    "as trained": lambda m: None,
    "no interpolation": lambda m: setattr(latent, "shape_interpolation", no_interpolation),
    "drawing not given back": lambda m: setattr(m.model, "drawing_width", 0.0),
    "band of 2 cells at inference": lambda m: setattr(m.model, "active_margin", 2),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--ckpt", default="outputs/demo/checkpoints/best.ckpt")
    parser.add_argument("--json", default=str(ROOT / "docs" / "evidence_ablation.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    data_cfg = yaml.safe_load(Path(args.config).read_text())["data"]
    data_cfg.get("cases", {}).pop("phantoms", None)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    results: dict[str, dict[str, Any]] = {}
    for variant, apply in VARIANTS.items():
        module = LoRAMeshDecoderModule.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True)
        latent.shape_interpolation = INTERPOLATION
        apply(module)
        for name in ("1 slice", "3 orthogonal", "stack 10 mm"):
            (logged,) = trainer.validate(
                module, datamodule=layout_data(data_cfg, name, "volume"), verbose=False
            )
            row = {k.removeprefix("val/"): float(v) for k, v in logged.items() if k.startswith("val/")}
            results.setdefault(variant, {})[name] = row
            print(f"{variant}, {name}: Dice {row['dice']:.3f}, HD95 {row['hd95_mm']:.2f}", flush=True)
    latent.shape_interpolation = INTERPOLATION
    Path(args.json).write_text(json.dumps(results, indent=2))
    print("| variant | 1 slice | 3 orthogonal | stack 10 mm |\n|---|---|---|---|")
    for variant, rows in results.items():
        cells = [
            f"{rows[n]['dice']:.3f} / {rows[n]['hd95_mm']:.2f}"
            for n in ("1 slice", "3 orthogonal", "stack 10 mm")
        ]
        print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
