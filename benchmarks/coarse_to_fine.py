"""Coarse to fine vs the one-stage design: training-step time per sample at the demo size, and what
the reference-size decoder (R = 64, 768 channels, 12 blocks) costs on a real-size organ's active set.

Measured in one run on the same heart phantoms:
- demo size (64 channels, 4 blocks): one LoRA training step (forward + backward + AdamW) of the
  two-stage model at R = 16 (the shipped base's stage 1 + decoder on the active band), against the one-stage design
  it replaces (the decoder on the dense R^3 slice unprojection) at R = 8 (the former demo) and at
  R = 16 (what one stage would cost at the new grid);
- reference size, LoRA, gradient checkpointing, batch 1: the active voxels of one central axial
  slice per heart structure (true coarse surface band, margin 1), one forward + backward of the
  largest: time and peak resident memory; and the
  dense input the one-stage design would need (64^3 cells, 16.8M output voxels).

    python benchmarks/coarse_to_fine.py [--repeats 3] [--json out.json] [--skip-reference]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lora_sam3d.data import TS_SAM3D_Dataset, collate, write_phantoms
from lora_sam3d.inputs import Batch
from lora_sam3d.lora import LoRAConfig, freeze_base_params, inject_lora
from lora_sam3d.models import SLatMeshDecoder, vertex_sdf_grid
from lora_sam3d.models.latent import SliceUnprojection
from lora_sam3d.models.structure import active_latent, surface_band
from lora_sam3d.training.losses import reconstruction_losses
from lora_sam3d.training.module import LoRAMeshDecoderModule

DEMO = dict(model_channels=64, num_blocks=4, num_heads=4, num_groups=8)
REFERENCE = dict(resolution=64, model_channels=768, latent_channels=8, num_blocks=12, num_heads=12,
                 use_checkpoint=True)  # fmt: skip
CLASSES = ["heart_myocardium", "heart_atrium_left", "heart_ventricle_left", "heart_atrium_right",
           "heart_ventricle_right"]  # fmt: skip


def samples(root: Path, resolution: int, n: int) -> dict[str, Any]:
    ds = TS_SAM3D_Dataset(
        root,
        CLASSES,
        split="train",
        frame={"resolution": resolution},
        preprocessing={"spacing_mm": 1.5},
        seed=1,
    )
    return collate([ds[i] for i in range(n)])


def timed_steps(step: Any, params: list[torch.nn.Parameter], repeats: int) -> float:
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        opt.zero_grad()
        step().backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def two_stage(batch: Batch, repeats: int, base: str = "builtin:shapes", **model: Any) -> dict[str, Any]:
    """The demo's LoRA training step on ``batch`` (``model``: further module arguments)."""
    module = LoRAMeshDecoderModule(
        decoder=dict(DEMO, resolution=16), base={"checkpoint": base}, classes=CLASSES, **model
    )
    module.configure_adapters()
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    actives: list[int] = []

    def step() -> torch.Tensor:
        rec = module(batch)
        actives.append(int(rec.active.sum()))
        return reconstruction_losses(rec, batch.targets, module.loss_weights, 64)["loss"]

    seconds = timed_steps(step, params, repeats)
    return {
        "design": "two-stage, R=16",
        "step_s": seconds,
        "active_voxels_per_sample": actives[-1] / len(batch),
    }


def one_stage(batch: Batch, resolution: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    decoder = SLatMeshDecoder(**DEMO, resolution=resolution, latent_channels=8)
    torch.nn.init.normal_(decoder.out_layer.weight, std=0.01)
    inject_lora(decoder, LoRAConfig())
    freeze_base_params(decoder)
    evidence = SliceUnprojection(resolution)
    n = 4 * resolution

    def step() -> torch.Tensor:
        feats = evidence(batch.evidence)
        dense = torch.ones(feats.shape[0], resolution, resolution, resolution, dtype=torch.bool)
        sdf = vertex_sdf_grid(decoder(active_latent(dense, feats)), n)
        return (sdf.clamp(-0.1, 0.1) - batch.targets.sdf.clamp(-0.1, 0.1)).abs().mean()

    params = [p for p in decoder.parameters() if p.requires_grad]
    return {"design": f"one-stage dense, R={resolution}", "step_s": timed_steps(step, params, repeats),
            "active_voxels_per_sample": resolution**3}  # fmt: skip


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reference(root: Path) -> dict[str, Any]:
    """One central axial slice per heart structure of a training case, framed at R = 64."""
    ds = TS_SAM3D_Dataset(root, CLASSES, split="train", slice_sampling_method="central", frame={"resolution": 64},
                          preprocessing={"spacing_mm": 1.5}, sampling={"axes": [2]})  # fmt: skip
    n_samples = len(CLASSES)
    batch = collate([ds[i] for i in range(n_samples)])  # items run case -> class: one per structure
    bands = surface_band(batch.targets.coarse_occupancy.bool(), 1)
    counts = bands.flatten(1).sum(1).tolist()
    assert batch.info.class_name == CLASSES, batch.info.class_name
    torch.manual_seed(0)
    decoder = SLatMeshDecoder(**REFERENCE)
    inject_lora(decoder, LoRAConfig())
    freeze_base_params(decoder)
    i = max(range(n_samples), key=lambda k: counts[k])  # the largest active set of the samples
    x = active_latent(bands[i : i + 1], torch.randn(1, 8, 64, 64, 64))
    before = peak_rss_bytes()
    start = time.perf_counter()
    out = decoder(x)
    loss = out.feats[:, :8].square().mean()
    loss.backward()
    seconds = time.perf_counter() - start
    return {
        "active_voxels_per_sample": counts,
        "measured_active_voxels": int(x.feats.shape[0]),
        "output_voxels": int(out.feats.shape[0]),
        "fwd_bwd_s": seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_before_bytes": before,
        "dense_input_voxels": 64**3,
        "dense_output_voxels": 256**3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lora-sam3d-c2f-")) / "heart"
    write_phantoms(root, n_cases=6, kind="heart")
    rows = [two_stage(samples(root, 16, args.batch), args.repeats)]
    rows.append(one_stage(samples(root, 8, args.batch), 8, args.repeats))
    rows.append(one_stage(samples(root, 16, args.batch), 16, args.repeats))
    base = rows[1]["step_s"]
    for r in rows:
        r["step_s_per_sample"] = r["step_s"] / args.batch
        r["x_one_stage_r8"] = r["step_s"] / base
        print(f"{r['design']:28s} step {r['step_s']:.3f} s ({r['step_s_per_sample'] * 1e3:.0f} ms/sample), "
              f"{r['x_one_stage_r8']:.2f}x one-stage R=8, {r['active_voxels_per_sample']:.0f} input voxels/sample")  # fmt: skip
    result: dict[str, Any] = {"batch": args.batch, "demo": rows}
    if not args.skip_reference:
        ref = reference(root)
        result["reference"] = ref
        print(f"reference size: active voxels per sample {ref['active_voxels_per_sample']}; one sample of "
              f"{ref['measured_active_voxels']} -> {ref['output_voxels']} output voxels: fwd+bwd {ref['fwd_bwd_s']:.1f} s, "
              f"peak RSS {ref['peak_rss_bytes'] / 2**30:.2f} GiB (dense would be {64**3} -> {256**3})")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
