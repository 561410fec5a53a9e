"""LoRA training steps of the reference-size decoder (Meta's size: R=64, 768 channels, 12 blocks)
on a GPU in bf16, against full fine-tuning of the same decoder in the same run.

Prints per variant the median step time, the peak GPU memory and the checkpoint sizes (the PEFT
adapter file, our trainable-only Lightning checkpoint, the whole decoder), plus the LoRA/full
ratios. The step is the training path of `LoRAMeshDecoderModule`: decoder forward on ~20k active
voxels, the (4R+1)^3 vertex SDF grid, truncated L1 against a sphere, backward, AdamW.

    python benchmarks/reference_gpu.py                 # on a CUDA GPU (about a minute)
    python benchmarks/reference_gpu.py --device cpu --size small --steps 2   # checks the script runs
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from lora_sam3d.lora import LoRAConfig, freeze_base_params, inject_lora, save_adapter
from lora_sam3d.models import SLatMeshDecoder, vertex_sdf_grid
from lora_sam3d.sparse import SparseTensor

sys.path.insert(0, str(Path(__file__).parent))
from decoder import shell_coords

SIZES: dict[str, dict[str, Any]] = {
    "reference": dict(resolution=64, model_channels=768, num_blocks=12, num_heads=12),
    "small": dict(resolution=16, model_channels=128, num_blocks=2, num_heads=4, num_groups=16),
}


def sphere_sdf(n: int, device: torch.device) -> torch.Tensor:
    axis = torch.linspace(-0.5, 0.5, n + 1, device=device)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)
    return grid.norm(dim=-1) - 0.3


def run_variant(
    model: SLatMeshDecoder,
    x: SparseTensor,
    target: torch.Tensor,
    steps: int,
    device: torch.device,
    bf16: bool,
) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    n = 4 * model.resolution
    times = []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps + 1):  # the first step warms up kernels and allocator
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            sdf = vertex_sdf_grid(model(x), n)
        loss = (sdf.float().clamp(-0.1, 0.1) - target.clamp(-0.1, 0.1)).abs().mean()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    trainable = {n_: p.detach().cpu() for n_, p in model.named_parameters() if p.requires_grad}
    buf = io.BytesIO()
    torch.save({"state_dict": trainable, "optimizer_states": [opt.state_dict()]}, buf)
    return {
        "step_s": statistics.median(times),
        "peak_gpu_bytes": peak,
        "trainable_params": sum(p.numel() for p in params),
        "lightning_checkpoint_bytes": len(buf.getvalue()),
        "loss": float(loss.detach()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="reference")
    parser.add_argument("--voxels", type=int, default=20_000, help="active latent voxels (one shell)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-bf16", action="store_true", help="fp32 instead of bf16 autocast")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the blocks")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    spec = SIZES[args.size]
    r = spec["resolution"]
    coords = shell_coords(r, min(args.voxels / r**3, 0.2), batch=1)
    torch.manual_seed(0)
    x = SparseTensor(torch.randn(len(coords), 8), coords).to(device)
    target = sphere_sdf(4 * r, device)
    rows: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                            "size": args.size, **spec, "input_voxels": len(coords), "bf16": not args.no_bf16}  # fmt: skip
    for variant in ("lora", "full"):
        torch.manual_seed(0)
        model = SLatMeshDecoder(latent_channels=8, use_checkpoint=args.checkpointing, **spec)
        with torch.no_grad():  # a zero output layer would give LoRA no gradient (Meta zero-initialises it)
            model.out_layer.weight.normal_(0, 0.02)
        full_bytes = len(save({k: v.contiguous() for k, v in model.state_dict().items()}))
        if variant == "lora":
            inject_lora(model, LoRAConfig(rank=4, alpha=8, target_modules=["to_qkv", "to_out"]))
            freeze_base_params(model)
        model.to(device)
        rows[variant] = run_variant(model, x, target, args.steps, device, not args.no_bf16)
        rows[variant]["decoder_file_bytes"] = full_bytes
        if variant == "lora":
            with tempfile.TemporaryDirectory() as tmp:
                save_adapter(model, tmp)
                rows["lora"]["adapter_file_bytes"] = (Path(tmp) / "adapter_model.safetensors").stat().st_size
        del model
    lora, full = rows["lora"], rows["full"]
    rows["lora_over_full_time"] = lora["step_s"] / full["step_s"]
    if lora["peak_gpu_bytes"] is not None:
        rows["lora_over_full_peak_memory"] = lora["peak_gpu_bytes"] / full["peak_gpu_bytes"]
    mib = 2**20
    print(f"{rows['device']}: {args.size} decoder (R={r}, C={spec['model_channels']}, {spec['num_blocks']} blocks), "
          f"{len(coords)} voxels in, {'bf16' if not args.no_bf16 else 'fp32'}, median of {args.steps} steps")  # fmt: skip
    print("| variant | step s | peak GPU MiB | trainable params | Lightning ckpt MiB | adapter file KiB |")
    print("|---|---|---|---|---|---|")
    for name in ("lora", "full"):
        v = rows[name]
        peak = f"{v['peak_gpu_bytes'] / mib:.0f}" if v["peak_gpu_bytes"] is not None else "n/a"
        adapter = f"{v['adapter_file_bytes'] / 2**10:.0f}" if "adapter_file_bytes" in v else "-"
        print(f"| {name} | {v['step_s']:.3f} | {peak} | {v['trainable_params']:,} | "
              f"{v['lightning_checkpoint_bytes'] / mib:.2f} | {adapter} |")  # fmt: skip
    print(f"LoRA/full: step time {rows['lora_over_full_time']:.2f}x"
          + (f", peak memory {rows['lora_over_full_peak_memory']:.2f}x" if "lora_over_full_peak_memory" in rows else "")
          + f"; decoder file {full['decoder_file_bytes'] / mib:.1f} MiB")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
