"""Entry point of the `lora-sam3d` command.

Available now: ``phantoms`` (write synthetic data in TotalSegmentator's layouts). The training
commands (fit / validate / test / predict, a LightningCLI) arrive with the training module; until
then they say so instead of pretending to train.
"""

from __future__ import annotations

import argparse
import sys

from lora_sam3d import __version__

TRAINING_COMMANDS = ("fit", "validate", "test", "predict")


def _phantoms(args: argparse.Namespace) -> int:
    from lora_sam3d.data.phantoms import write_phantoms

    ids = write_phantoms(
        args.root, n_cases=args.n_cases, kind=args.kind, layout=args.layout, shape=args.shape,
        spacing=args.spacing, seed=args.seed,
    )  # fmt: skip
    print(
        f"wrote {len(ids)} {args.kind} phantoms ({args.layout} layout) to {args.root}: {ids[0]} .. {ids[-1]}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lora-sam3d",
        description="LoRA fine-tuning of SAM 3D Objects' mesh decoder on medical volumes.",
        epilog="fit, validate, test and predict are not built yet.",
    )
    parser.add_argument("--version", action="version", version=f"lora-sam3d {__version__}")
    sub = parser.add_subparsers(dest="command")
    ph = sub.add_parser("phantoms", help="write synthetic CT phantoms (NIfTI, TotalSegmentator layout)")
    ph.add_argument("--root", required=True, help="output folder")
    ph.add_argument("--kind", choices=("heart", "shapes"), default="heart")
    ph.add_argument("--layout", choices=("totalsegmentator", "cropped"), default="totalsegmentator")
    ph.add_argument("--n-cases", type=int, default=12)
    ph.add_argument("--shape", type=int, nargs=3, default=(96, 96, 64), metavar=("X", "Y", "Z"))
    ph.add_argument("--spacing", type=float, nargs=3, default=(1.6, 1.6, 2.5), metavar=("SX", "SY", "SZ"))
    ph.add_argument("--seed", type=int, default=0)
    ph.set_defaults(run=_phantoms)
    for name in TRAINING_COMMANDS:
        sub.add_parser(name, help="not available yet")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TRAINING_COMMANDS:
        print(f"lora-sam3d: '{argv[0]}' is not available in this version yet.", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
