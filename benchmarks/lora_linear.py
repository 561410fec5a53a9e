"""Forward+backward time of one frozen linear with LoRA: ours vs PEFT's layer vs the plain layer.

The shape is SAM 3D's fused qkv projection at the reference size (768 -> 2304) on 8192 tokens,
r=4. The upstream gradient is a random tensor (a `.sum()` would give a stride-0 gradient and
distort the timings), and the input requires grad, as inside a network. All variants run in one
process, interleaved, so the ratios compare like with like.

    python benchmarks/lora_linear.py [--tokens 8192] [--repeats 30] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lora_sam3d.lora import LoRALinear


def time_fwd_bwd(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        start = time.perf_counter()
        layer(x).backward(grad)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--in-features", type=int, default=768)
    parser.add_argument("--out-features", type=int, default=2304)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    plain = nn.Linear(args.in_features, args.out_features).requires_grad_(False)
    ours = LoRALinear(copy.deepcopy(plain), rank=args.rank, alpha=2 * args.rank)
    ours.weight.requires_grad_(False)
    ours.bias.requires_grad_(False)
    with torch.no_grad():
        ours.lora_B.normal_(0, 0.01)
    holder = nn.Sequential()
    holder.add_module("proj", copy.deepcopy(plain))
    peft_model = get_peft_model(
        holder, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["proj"])
    )
    peft_layer = peft_model.base_model.model.proj
    merged = ours.merge().requires_grad_(False)

    x = torch.randn(args.tokens, args.in_features, requires_grad=True)
    grad = torch.randn(args.tokens, args.out_features)
    variants: dict[str, nn.Module] = {"plain": plain, "ours": ours, "peft": peft_layer, "ours merged": merged}
    for layer in variants.values():  # warm-up
        time_fwd_bwd(layer, x, grad, 3)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    runners: dict[str, Callable[[], list[float]]] = {
        name: (lambda layer=layer: time_fwd_bwd(layer, x, grad, 1)) for name, layer in variants.items()
    }
    for _ in range(args.repeats):
        for name, run in runners.items():
            samples[name] += run()
    median = {name: statistics.median(t) for name, t in samples.items()}
    print(
        f"fwd+bwd, Linear({args.in_features}, {args.out_features}) frozen, {args.tokens} tokens, r={args.rank}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print(f"{'variant':<12} {'median ms':>10} {'x plain':>8}")
    rows = []
    for name, t in median.items():
        ratio = t / median["plain"]
        rows.append({"variant": name, "median_ms": 1000 * t, "ratio_vs_plain": ratio})
        print(f"{name:<12} {1000 * t:>10.2f} {ratio:>8.3f}")
    print(f"peft / ours: {median['peft'] / median['ours']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "tokens": args.tokens, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
