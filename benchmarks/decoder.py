"""Decoder speed and memory: ours vs Meta's reference (`sam3d` wheel), same weights, same input.

For each config: the reference's forward on 1 thread (its only correct CPU setting: spconv's CPU
submanifold conv races on more) and on 2 threads (timed only), ours on 1 and 2 threads, and our
forward+backward (LoRA r=4 on to_qkv/to_out, base frozen, the training case) with its peak
memory. Inputs are spherical shells, like SAM 3D's structures (a few % of the grid).
The reference needs the `reference` extra (see pyproject.toml); without it only ours is timed.

    python benchmarks/decoder.py [--configs tiny mid ref16] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lora_sam3d.lora import freeze_base_params, inject_lora
from lora_sam3d.models import SLatMeshDecoder
from lora_sam3d.sparse import SparseTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

CONFIGS: dict[str, dict[str, Any]] = {
    # The CPU-size decoder (`TINY_DECODER`, the defaults under model.decoder).
    "tiny": dict(
        model=dict(resolution=16, model_channels=128, num_blocks=4, num_heads=4, num_groups=16),
        occupancy=0.08,
    ),
    # The mid config: resolution 32, 256 channels, 4 blocks, ~5% occupancy, batch 2.
    "mid": dict(model=dict(resolution=32, model_channels=256, num_blocks=4, num_heads=4), occupancy=0.05),
    # The configuration timed for the reference when the project started: 30% occupancy, 2 blocks.
    "ref16": dict(model=dict(resolution=16, model_channels=256, num_blocks=2, num_heads=4), occupancy=0.30),
}


def shell_coords(resolution: int, occupancy: float, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Shells of thickness chosen to hit ``occupancy`` (dense cubes above ~25%), one per batch element."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.arange(resolution).float()
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)
    out = []
    for b in range(batch):
        centre = resolution / 2 + (torch.rand(3, generator=g) - 0.5) * resolution * 0.1
        dist = (grid - centre).norm(dim=-1)
        radius = resolution * (0.3 + 0.05 * b)
        # shell volume 4 pi r^2 t = occupancy * res^3
        thickness = occupancy * resolution**3 / (4 * torch.pi * radius**2)
        occ = (
            (dist - radius).abs() < thickness / 2
            if occupancy < 0.25
            else dist < (occupancy * resolution**3 * 3 / (4 * torch.pi)) ** (1 / 3)
        )
        xyz = torch.nonzero(occ)
        out.append(torch.cat([torch.full((len(xyz), 1), b), xyz], 1))
    return torch.cat(out).int()


def randomize(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(
                torch.randn(p.shape, generator=g) / max(p[0].numel(), 1) ** 0.5
                if p.dim() > 1
                else 0.05 * torch.randn(p.shape, generator=g)
            )


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (builds neighbour tables, attention plans, allocator pools)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def peak_rss_delta_bytes(fn) -> int:
    """Peak resident memory during ``fn`` above the resident memory before it (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def bench(name: str, spec: dict[str, Any], repeats: int, with_reference: bool) -> dict[str, Any]:
    config = dict(latent_channels=8, attn_mode="swin", window_size=8, **spec["model"])
    coords = shell_coords(config["resolution"], spec["occupancy"])
    feats = torch.randn(coords.shape[0], 8, generator=torch.Generator().manual_seed(1))
    ours = SLatMeshDecoder(**config)
    randomize(ours)
    row: dict[str, Any] = {
        "config": name,
        **{k: config[k] for k in ("resolution", "model_channels", "num_blocks")},
        "input_voxels": coords.shape[0],
        "output_voxels": 64 * coords.shape[0],
        "occupancy": round(coords.shape[0] / (2 * config["resolution"] ** 3), 4),
    }

    def ours_forward() -> None:
        with torch.no_grad():
            ours(SparseTensor(feats, coords))

    for threads in (1, 2):
        torch.set_num_threads(threads)
        row[f"ours_fwd_s_{threads}t"] = timed(ours_forward, repeats)

    if with_reference:
        import reference

        ref = reference.build(**config)
        ref.load_state_dict(ours.state_dict())
        _, sp = reference.load()

        def ref_forward() -> None:
            x = sp.SparseTensor(feats=feats, coords=coords)
            with torch.no_grad():
                h = super(type(ref), ref).forward(x)
                for block in ref.upsample:
                    h = block(h)
                ref.out_layer(h)

        for threads in (1, 2):
            torch.set_num_threads(threads)
            row[f"ref_fwd_s_{threads}t"] = timed(ref_forward, repeats)
        row["ours2t_over_ref1t"] = row["ours_fwd_s_2t"] / row["ref_fwd_s_1t"]
        row["ours1t_over_ref1t"] = row["ours_fwd_s_1t"] / row["ref_fwd_s_1t"]
        row["ours2t_over_ref2t"] = row["ours_fwd_s_2t"] / row["ref_fwd_s_2t"]

    torch.set_num_threads(2)
    inject_lora(ours, target_modules=["to_qkv", "to_out"], rank=4, alpha=8)
    freeze_base_params(ours)
    grad_seed = torch.Generator().manual_seed(2)
    upstream = torch.randn(64 * coords.shape[0], 53, generator=grad_seed)

    def ours_train_step() -> None:
        out = ours(SparseTensor(feats, coords))
        out.feats.backward(upstream)

    row["ours_fwd_bwd_s_2t"] = timed(ours_train_step, repeats)
    row["ours_fwd_bwd_peak_bytes"] = peak_rss_delta_bytes(ours_train_step)
    row["ours_fwd_peak_bytes"] = peak_rss_delta_bytes(ours_forward)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    import reference

    with_reference = not args.no_reference and reference.available()
    rows = []
    for name in args.configs:
        row = bench(name, CONFIGS[name], args.repeats, with_reference)
        rows.append(row)
        print(json.dumps(row))
    print()
    header = "| config | in voxels | out voxels | ref fwd 1t s | ref fwd 2t s | ours fwd 1t s | ours fwd 2t s | ours 2t / ref 1t | ours fwd+bwd 2t s | fwd+bwd peak MiB |"
    print(header)
    print("|" + "---|" * header.count("|")[:-1] if False else "|---" * (header.count("|") - 1) + "|")
    for r in rows:
        print(
            f"| {r['config']} (R={r['resolution']}, C={r['model_channels']}, {r['num_blocks']} blocks) | {r['input_voxels']} | "
            f"{r['output_voxels']} | {r.get('ref_fwd_s_1t', float('nan')):.3f} | {r.get('ref_fwd_s_2t', float('nan')):.3f} | "
            f"{r['ours_fwd_s_1t']:.3f} | {r['ours_fwd_s_2t']:.3f} | {r.get('ours2t_over_ref1t', float('nan')):.2f} | "
            f"{r['ours_fwd_bwd_s_2t']:.3f} | {r['ours_fwd_bwd_peak_bytes'] / 2**20:.0f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
