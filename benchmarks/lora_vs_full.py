"""LoRA vs full fine-tuning: training-step time and optimizer memory (demo and mid configs), and
adapter vs full checkpoint size for Meta's reference-size decoder. Both variants run in one process.

    python benchmarks/lora_vs_full.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lora_sam3d.lora import LoRAConfig, freeze_base_params, inject_lora, save_adapter
from lora_sam3d.models import SLatMeshDecoder
from lora_sam3d.sparse import SparseTensor

sys.path.insert(0, str(Path(__file__).parent))
from decoder import shell_coords

CONFIGS: dict[str, dict[str, Any]] = {
    "demo": dict(
        model=dict(resolution=8, model_channels=64, num_blocks=4, num_heads=4, num_groups=8),
        batch=8,
        dense=True,
    ),
    "mid": dict(
        model=dict(resolution=32, model_channels=256, num_blocks=4, num_heads=4), batch=2, dense=False
    ),
}


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
    )


def step_stats(model: torch.nn.Module, x: SparseTensor, repeats: int) -> tuple[float, int, int]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        opt.zero_grad()
        model(x).feats.square().mean().backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times), optimizer_bytes(opt), sum(p.numel() for p in params)


def bench(name: str, spec: dict[str, Any], repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    base = SLatMeshDecoder(latent_channels=8, **spec["model"])
    r = spec["model"]["resolution"]
    if spec["dense"]:
        grid = torch.nonzero(torch.ones(r, r, r)).int()
        coords = torch.cat(
            [
                torch.cat([torch.full((len(grid), 1), b, dtype=torch.int32), grid], 1)
                for b in range(spec["batch"])
            ]
        )
    else:
        coords = shell_coords(r, 0.05, batch=spec["batch"])
    x = SparseTensor(torch.randn(coords.shape[0], 8), coords)
    lora = copy.deepcopy(base)
    inject_lora(lora, LoRAConfig())
    freeze_base_params(lora)
    t_lora, mem_lora, n_lora = step_stats(lora, x, repeats)
    t_full, mem_full, n_full = step_stats(base, x, repeats)
    return {
        "config": name, **spec["model"], "batch": spec["batch"], "input_voxels": coords.shape[0],
        "lora_step_s": t_lora, "full_step_s": t_full, "lora_over_full_time": t_lora / t_full,
        "lora_trainable": n_lora, "full_trainable": n_full,
        "lora_optimizer_bytes": mem_lora, "full_optimizer_bytes": mem_full,
    }  # fmt: skip


def reference_sizes() -> dict[str, Any]:
    model = SLatMeshDecoder(resolution=64, model_channels=768, latent_channels=8, num_blocks=12, num_heads=12)
    full_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    inject_lora(model, LoRAConfig())
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, tmp)
        adapter = Path(tmp) / "adapter_model.safetensors"
        adapter_bytes = adapter.stat().st_size
    lora_params = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    return {"reference_full_params": sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n),
            "reference_full_bytes_fp32": full_bytes, "reference_lora_params": lora_params,
            "reference_adapter_file_bytes": adapter_bytes, "adapter_over_full": adapter_bytes / full_bytes}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = [bench(name, spec, args.repeats) for name, spec in CONFIGS.items()]
    sizes = reference_sizes()
    print(
        "| config | voxels in | LoRA step s | full step s | LoRA/full time | trainable LoRA / full | optimizer state LoRA / full |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} (R={r['resolution']}, C={r['model_channels']}, batch {r['batch']}) | {r['input_voxels']} | "
              f"{r['lora_step_s']:.3f} | {r['full_step_s']:.3f} | {r['lora_over_full_time']:.2f} | "
              f"{r['lora_trainable']:,} / {r['full_trainable']:,} | "
              f"{r['lora_optimizer_bytes'] / 2**10:.0f} KiB / {r['full_optimizer_bytes'] / 2**20:.1f} MiB |")  # fmt: skip
    print(f"\nreference size: {sizes['reference_full_params']:,} parameters = {sizes['reference_full_bytes_fp32'] / 2**20:.1f} MiB fp32; "
          f"LoRA r=4 on to_qkv+to_out: {sizes['reference_lora_params']:,} parameters, adapter file "
          f"{sizes['reference_adapter_file_bytes'] / 2**10:.0f} KiB ({100 * sizes['adapter_over_full']:.2f}% of the decoder)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": rows, "sizes": sizes}, indent=2))


if __name__ == "__main__":
    main()
