"""The `lora-sam3d` command: a LightningCLI (fit, validate, test, predict) plus `phantoms` and `export`.

A YAML file is the whole experiment (`configs/demo.yaml`). The data module's resolution is linked
from the decoder's and its class list to the model's, so the two cannot disagree. Errors from bad
paths or settings print one line (set LORA_SAM3D_DEBUG=1 for the traceback). Checkpoints are
written by `AtomicCheckpointIO` unless the config names other ``trainer.plugins``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from lora_sam3d import __version__

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


def _decoder_resolution(decoder: dict[str, Any] | None) -> int:
    from lora_sam3d.module import TINY_DECODER

    return int({**TINY_DECODER, **(decoder or {})}["resolution"])


def _lightning_cli(args: list[str] | None, model_class: type | None = None) -> None:
    """LightningCLI over `LoRAMeshDecoderModule` (or a subclass with the same arguments, e.g. a baseline)."""
    import torch
    from lightning.pytorch.cli import LightningCLI

    from lora_sam3d.checkpoint_io import READ_ERRORS, check_design, unreadable
    from lora_sam3d.data import TSDataModule
    from lora_sam3d.module import LoRAMeshDecoderModule

    class LoRASAM3DCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.link_arguments("data.classes", "model.classes")
            parser.link_arguments("model.decoder", "data.resolution", compute_fn=_decoder_resolution)

        def _parse_ckpt_path(self) -> None:
            """LightningCLI reads ``--ckpt_path``'s hyper-parameters (they then define the model);
            a file torch cannot read gets our one-line error instead of a traceback."""
            path = (
                self.config[self.config.subcommand].get("ckpt_path")
                if self.config.get("subcommand")
                else None
            )
            try:
                if path and Path(path).is_file():  # before its hyper-parameters reach the parser
                    meta = torch.load(path, weights_only=True, map_location="cpu").get("lora_sam3d")
                    if isinstance(meta, dict):
                        check_design(meta)
                super()._parse_ckpt_path()
            except READ_ERRORS as err:
                raise unreadable(path, err) from err

    LoRASAM3DCLI(
        model_class or LoRAMeshDecoderModule,
        TSDataModule,
        args=args,
        trainer_defaults={"plugins": [{"class_path": "lora_sam3d.checkpoint_io.AtomicCheckpointIO"}]},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "lora-sam3d"},
    )


def _phantoms(args: argparse.Namespace) -> None:
    from lora_sam3d.data.phantoms import write_phantoms

    ids = write_phantoms(
        args.root, n_cases=args.n_cases, kind=args.kind, layout=args.layout, shape=args.shape,
        spacing=args.spacing, seed=args.seed,
    )  # fmt: skip
    print(
        f"wrote {len(ids)} {args.kind} phantoms ({args.layout} layout) to {args.root}: {ids[0]} .. {ids[-1]}"
    )


def _export(args: argparse.Namespace) -> None:
    from lora_sam3d.callbacks import save_merged_decoder
    from lora_sam3d.checkpoint_io import READ_ERRORS, save_module_adapter, unreadable
    from lora_sam3d.module import LoRAMeshDecoderModule

    ckpt = Path(args.ckpt_path)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    try:
        module = LoRAMeshDecoderModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    except READ_ERRORS as err:
        raise unreadable(ckpt, err) from err
    out = Path(args.output)
    written = [save_merged_decoder(module, out / "decoder-merged.safetensors")]
    if module.hparams.finetune == "lora":
        written.append(save_module_adapter(module, out / "adapter"))
    for path in written:
        print(f"wrote {path}")


def _extra_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-sam3d",
        description="LoRA fine-tuning of SAM 3D Objects' mesh decoder on medical volumes.",
        epilog="Training: lora-sam3d {fit,validate,test,predict} --config configs/demo.yaml (see --help of each).",
    )
    parser.add_argument("--version", action="version", version=f"lora-sam3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{fit,validate,test,predict,phantoms,export}")
    ph = sub.add_parser("phantoms", help="write synthetic CT phantoms (NIfTI, TotalSegmentator layout)")
    ph.add_argument("--root", required=True, help="output folder")
    ph.add_argument("--kind", choices=("heart", "shapes"), default="heart")
    ph.add_argument("--layout", choices=("totalsegmentator", "cropped"), default="totalsegmentator")
    ph.add_argument("--n-cases", type=int, default=12)
    ph.add_argument("--shape", type=int, nargs=3, default=(96, 96, 64), metavar=("X", "Y", "Z"))
    ph.add_argument("--spacing", type=float, nargs=3, default=(1.6, 1.6, 2.5), metavar=("SX", "SY", "SZ"))
    ph.add_argument("--seed", type=int, default=0)
    ph.set_defaults(run=_phantoms)
    ex = sub.add_parser("export", help="merge a trained checkpoint: decoder-merged.safetensors + adapter/")
    ex.add_argument("--ckpt_path", required=True)
    ex.add_argument("--output", required=True, help="output folder")
    ex.set_defaults(run=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    explicit = argv is not None
    argv = list(argv) if explicit else sys.argv[1:]
    try:
        if argv and argv[0] in TRAINER_COMMANDS:
            _lightning_cli(argv if explicit else None)
            return 0
        parser = _extra_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        args.run(args)
        return 0
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        if os.environ.get("LORA_SAM3D_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"lora-sam3d: error: {type(err).__name__}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
