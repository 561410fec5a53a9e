"""Entry point of the `lora-sam3d` command.

The Lightning CLI (fit / validate / test / predict) arrives with the training module; until then
the command says so instead of pretending to train.
"""

from __future__ import annotations

import argparse
import sys

from lora_sam3d import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lora-sam3d",
        description="LoRA fine-tuning of SAM 3D Objects' mesh decoder on medical volumes.",
        epilog="The training commands (fit, validate, test, predict) are not built yet; "
        "the Python API lora_sam3d.lora is available.",
    )
    parser.add_argument("--version", action="version", version=f"lora-sam3d {__version__}")
    parser.add_argument("command", nargs="?", help="subcommand (not available yet)")
    args, _ = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    print(f"lora-sam3d: '{args.command}' is not available in this version yet.", file=sys.stderr)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
