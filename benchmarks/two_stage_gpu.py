"""The two-stage training step at Meta's size on a GPU: stage 1 + the active band + the decoder.

What `configs/sam3d.yaml` trains: `Reconstructor` at R = 64 (768 channels, 12 blocks), stage 1
trained fully and LoRA r = 4 on the decoder's ``to_qkv``/``to_out``, against full fine-tuning of
both stages, on heart-sized active sets (a synthetic ellipsoid whose true band holds about 5-9k
cells, ``band.train_on: truth`` so the set does not depend on a random stage 1). For batch 1 and 4,
bf16 autocast and fp32, with and without gradient checkpointing: median step time, steps/s, peak
GPU memory (`torch.cuda.max_memory_allocated`), trainable parameters, checkpoint and adapter
sizes, LoRA/full ratios; then bf16 against fp32 on the loss after ``--loss-steps`` steps. The step
is the module's: `Reconstructor.forward`, `reconstruction_losses`, backward, AdamW.

    python benchmarks/two_stage_gpu.py --json two_stage_gpu.json        # on a CUDA GPU (a few minutes)
    python benchmarks/two_stage_gpu.py --device cpu --size small --steps 1 --loss-steps 2   # the dry run the tests use
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lora_sam3d.inputs import Batch, Evidence, SampleInfo, Targets
from lora_sam3d.lora import LoRAConfig, freeze_base_params
from lora_sam3d.models import ModelConfig, Reconstructor
from lora_sam3d.models.adapters.files import save_model_adapter
from lora_sam3d.models.adapters.manifest import Manifest
from lora_sam3d.training.losses import LossWeights, reconstruction_losses

SIZES: dict[str, dict[str, Any]] = {
    "reference": {"decoder": dict(resolution=64, model_channels=768, num_blocks=12, num_heads=12, num_groups=32),
                  "structure": dict(channels=24, num_groups=8)},
    "small": {"decoder": dict(resolution=8, model_channels=64, num_blocks=1, num_heads=4, num_groups=8),
              "structure": dict(channels=8, num_groups=4)},
}  # fmt: skip
WEIGHTS = LossWeights()


def synthetic_batch(r: int, batch: int, device: torch.device) -> Batch:
    """``batch`` heart-sized ellipsoids in the frame (semi-axes 0.19-0.25 of the side, as a structure
    at frame_scale 2): one axial slice through each, and the targets on the grids the model uses."""
    n, size = 4 * r, 4 * r
    out: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("image", "mask", "mask_distance", "gt_sdf", "gt_occupancy", "gt_coarse_occupancy")
    }
    for b in range(batch):
        semi = torch.tensor([0.25, 0.21, 0.19]) * (1 + 0.04 * b)

        def sdf(
            points: torch.Tensor, semi: torch.Tensor = semi
        ) -> torch.Tensor:  # ~ellipsoid distance, frame units
            return ((points / semi).norm(dim=-1) - 1) * semi.min()

        vertices = torch.linspace(-0.5, 0.5, n + 1)
        grid = torch.stack(torch.meshgrid(vertices, vertices, vertices, indexing="ij"), -1)
        cells = (torch.arange(n) + 0.5) / n - 0.5
        cgrid = torch.stack(torch.meshgrid(cells, cells, cells, indexing="ij"), -1)
        coarse = (torch.arange(r) + 0.5) / r - 0.5
        rgrid = torch.stack(torch.meshgrid(coarse, coarse, coarse, indexing="ij"), -1)
        pixels = (torch.arange(size) + 0.5) / size - 0.5
        plane = torch.stack(torch.meshgrid(pixels, pixels, indexing="ij"), -1)
        disk = sdf(torch.cat([plane, torch.zeros(size, size, 1)], -1))
        out["mask"].append(disk < 0)
        out["mask_distance"].append(disk.float())
        out["image"].append(torch.where(disk < 0, 0.8, 0.3).expand(3, size, size).float())
        out["gt_sdf"].append(sdf(grid).clamp(-0.1, 0.1).float())
        out["gt_occupancy"].append(sdf(cgrid) < 0)
        out["gt_coarse_occupancy"].append(sdf(rgrid) < 0)
    t = {k: torch.stack(v) for k, v in out.items()}
    evidence = Evidence(
        image=t["image"][:, :1],
        mask=t["mask"][:, None],
        distance=t["mask_distance"][:, None],
        axis=torch.full((batch, 1), 2),
        index=torch.zeros(batch, 1, dtype=torch.long),
        offset=torch.zeros(batch, 1),
        valid=torch.ones(batch, 1, dtype=torch.bool),
        frame_to_world=torch.eye(4, dtype=torch.float64).expand(batch, 4, 4).clone(),
        sample_ids=[f"ellipsoid{b}" for b in range(batch)],
    )
    targets = Targets(t["gt_sdf"], t["gt_occupancy"], t["gt_coarse_occupancy"])
    names = [f"ellipsoid{b}" for b in range(batch)]
    return Batch(evidence, targets, SampleInfo(names, ["ellipsoid"] * batch, names, [None] * batch)).to(
        device
    )


def build(size: str, variant: str, checkpointing: bool, device: torch.device) -> Reconstructor:
    spec = SIZES[size]
    model = Reconstructor(
        ModelConfig(
            {**spec["decoder"], "use_checkpoint": checkpointing},
            spec["structure"],
            band={"train_on": "truth"},
        )
    )
    with torch.no_grad():  # Meta zero-initialises the output layer, which would give LoRA no gradient
        model.decoder.out_layer.weight.normal_(0, 0.02)
    if variant == "lora":
        model.add_lora(LoRAConfig(rank=4, alpha=8, target_modules=["to_qkv", "to_out"]))
        freeze_base_params(model.decoder)
        model.structure.requires_grad_(True)  # stage 1 trains fully (Meta's file has none)
    return model.to(device).train()


def run(model: Reconstructor, batch: Batch, steps: int, bf16: bool, device: torch.device) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4)
    n = 4 * model.resolution
    times, losses = [], []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    # On the CPU (the dry run) oneDNN's bf16 Conv3d weight gradient sometimes comes back as garbage
    # (1e36 or NaN in 4 of 15 identical steps, torch 2.13): bf16 there runs on PyTorch's own kernels.
    cpu_bf16 = device.type == "cpu" and bf16
    for i in range(steps + 1):  # step 0 warms up kernels and the allocator
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.backends.mkldnn.flags(enabled=not cpu_bf16):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                rec = model(batch.evidence, batch.targets.coarse_occupancy)
            loss = reconstruction_losses(rec, batch.targets, WEIGHTS, n)["loss"].float()
            loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    trainable = {k: p.detach().cpu() for k, p in model.named_parameters() if p.requires_grad}
    buf = io.BytesIO()
    torch.save({"state_dict": trainable}, buf)
    step = statistics.median(times) if times else float("nan")
    return {"step_s": step, "steps_per_s": 1 / step, "losses": losses,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "trainable_params": sum(p.numel() for p in params), "checkpoint_bytes": len(buf.getvalue()),
            "active_cells": int(rec.active.sum()) if rec.active is not None else None}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="reference")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up)")
    parser.add_argument(
        "--loss-steps", type=int, default=20, help="steps of the bf16-vs-fp32 loss comparison"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    r = SIZES[args.size]["decoder"]["resolution"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows: list[dict[str, Any]] = []
    print(f"{name}: {args.size} two-stage model (R={r}), median of {args.steps} steps after one warm-up")
    print(
        "| variant | batch | precision | checkpointing | active cells | step s | steps/s | peak GPU MiB | trainable |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for batch_size in args.batches:
        batch = synthetic_batch(r, batch_size, device)
        for variant in ("lora", "full"):
            for bf16 in (True, False):
                for checkpointing in (False, True):
                    torch.manual_seed(0)
                    model = build(args.size, variant, checkpointing, device)
                    try:
                        row = run(model, batch, args.steps, bf16, device)
                    except torch.OutOfMemoryError:
                        row = {"step_s": float("nan"), "steps_per_s": float("nan"), "peak_gpu_bytes": None,
                               "trainable_params": None, "checkpoint_bytes": None, "active_cells": None,
                               "losses": [], "error": "out of memory"}  # fmt: skip
                    row |= {
                        "variant": variant,
                        "batch": batch_size,
                        "bf16": bf16,
                        "checkpointing": checkpointing,
                    }
                    if variant == "lora" and not checkpointing and bf16 and batch_size == args.batches[0]:
                        with tempfile.TemporaryDirectory() as tmp:
                            save_model_adapter(model, tmp, Manifest.describe(model, ["structure"]))
                            row["adapter_bytes"] = sum(
                                p.stat().st_size for p in Path(tmp).rglob("*.safetensors")
                            )
                    rows.append(row)
                    peak = f"{row['peak_gpu_bytes'] / 2**20:.0f}" if row["peak_gpu_bytes"] else "n/a"
                    print(f"| {variant} | {batch_size} | {'bf16' if bf16 else 'fp32'} | {checkpointing} | "
                          f"{row['active_cells']} | {row['step_s']:.3f} | {row['steps_per_s']:.2f} | {peak} | "
                          f"{row['trainable_params']} |")  # fmt: skip
                    del model
    summary = compare(rows, args, device)
    for line in summary["lines"]:
        print(line)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": name, "size": args.size, "rows": rows, **summary}, indent=2)
        )


def compare(rows: list[dict[str, Any]], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """LoRA/full ratios at batch 1 (bf16, no checkpointing) and bf16 against fp32 on the loss after
    ``--loss-steps`` steps of the LoRA variant; each against the issue's target."""

    def pick(variant: str, bf16: bool = True, checkpointing: bool = False) -> dict[str, Any]:
        return next(r for r in rows if (r["variant"], r["batch"], r["bf16"], r["checkpointing"]) ==
                    (variant, args.batches[0], bf16, checkpointing))  # fmt: skip

    lora, full = pick("lora"), pick("full")
    out: dict[str, Any] = {"lora_over_full_time": lora["step_s"] / full["step_s"]}
    if lora["peak_gpu_bytes"] and full["peak_gpu_bytes"]:
        out["lora_over_full_peak_memory"] = lora["peak_gpu_bytes"] / full["peak_gpu_bytes"]
    batch = synthetic_batch(SIZES[args.size]["decoder"]["resolution"], args.batches[0], device)
    final = {}
    for bf16 in (True, False):
        torch.manual_seed(0)
        final[bf16] = run(build(args.size, "lora", False, device), batch, args.loss_steps - 1, bf16, device)[
            "losses"
        ][-1]
    out["loss_bf16"], out["loss_fp32"] = final[True], final[False]
    out["loss_relative_difference"] = abs(final[True] - final[False]) / abs(final[False])
    memory = out.get("lora_over_full_peak_memory")
    out["lines"] = [
        f"LoRA steps/s at batch {args.batches[0]} in bf16: {lora['steps_per_s']:.2f} (target >= 2: "
        f"{'met' if lora['steps_per_s'] >= 2 else 'not met'})",
        f"LoRA/full step time {out['lora_over_full_time']:.2f}x; peak memory "
        + (
            f"{memory:.2f}x (target <= 0.60: {'met' if memory <= 0.6 else 'not met'})"
            if memory
            else "n/a (no GPU)"
        ),
        f"loss after {args.loss_steps} steps: bf16 {final[True]:.5f}, fp32 {final[False]:.5f}, relative difference "
        f"{out['loss_relative_difference']:.2e} (target <= 1e-2: {'met' if out['loss_relative_difference'] <= 1e-2 else 'not met'})",
    ]
    return out


if __name__ == "__main__":
    main()
