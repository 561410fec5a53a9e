"""The `lora-sam3d` command: fit, validate, test, predict (`lora_sam3d.cli.trainer`, a LightningCLI)
plus `phantoms`, `export` and `cache`.

Lightning is imported only for the trainer commands, so the others start fast. Errors from bad
paths or settings print one line (`lora_sam3d.cli.errors`; set LORA_SAM3D_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
from pathlib import Path
from typing import Any, TextIO

from lora_sam3d import __version__
from lora_sam3d.cli.errors import error_line

__all__ = ["TRAINER_COMMANDS", "main"]

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


def _check_yaml(argv: list[str]) -> None:
    """A config file that is not valid YAML: one line naming the file, the problem, line and column
    (the parser's own message names neither the file nor the option)."""
    import yaml

    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg in ("--config", "-c") and i + 1 < len(argv) else None
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else path
        if path is None or not Path(path).is_file():
            continue
        try:
            yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"config {path} is not valid YAML: {problem}{where}") from None


def _lightning_cli(args: list[str] | None) -> None:
    from lora_sam3d.cli.trainer import run

    run(args)


def _phantoms(args: argparse.Namespace) -> None:
    from lora_sam3d.data.phantoms import write_phantoms

    ids = write_phantoms(
        args.root,
        n_cases=args.n_cases,
        kind=args.kind,
        layout=args.layout,
        shape=args.shape,
        spacing=args.spacing,
        seed=args.seed,
        workers=args.workers,
        modality=args.modality,
    )
    print(
        f"wrote {len(ids)} {args.kind} phantoms ({args.modality.upper()}, {args.layout} layout) to {args.root}: "
        f"{ids[0]} .. {ids[-1]}"
    )


def _export(args: argparse.Namespace) -> None:
    """``export``: an adapter folder is merged on its base by the model alone (no Lightning); a
    checkpoint is read by the LightningModule it was written by, and its adapter written beside."""
    if (args.ckpt_path is None) == (args.adapter is None):
        raise ValueError("export needs --ckpt_path (a trained checkpoint) or --adapter (an adapter folder)")
    out = Path(args.output)
    if args.adapter is not None:  # one adapter of several trained on one base: merged on its own
        from lora_sam3d.models import Reconstructor

        model = Reconstructor.from_adapter(args.adapter)
        print(f"wrote {model.save_merged(out / 'decoder-merged.safetensors')}")
        print(model.merged_note())
        return
    from lora_sam3d.io.weights import READ_ERRORS, require_file, unreadable
    from lora_sam3d.training.callbacks import save_adapter_of
    from lora_sam3d.training.module import LoRAMeshDecoderModule

    ckpt = require_file(args.ckpt_path)
    try:
        module = LoRAMeshDecoderModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    except READ_ERRORS as err:
        raise unreadable(ckpt, err) from err
    written = [module.model.save_merged(out / "decoder-merged.safetensors")]
    if module.finetune.mode == "lora":
        written.append(save_adapter_of(module, out / "adapter"))
    for path in written:
        print(f"wrote {path}")
    print(module.model.merged_note())


def _build_cache(args: argparse.Namespace) -> int:
    """``cache --build``: every case of a data set cached, ``--workers`` at once, with progress; a case
    that fails is named and skipped; a summary at the end; exit status 1 when any failed."""
    import yaml

    from lora_sam3d.data import TSDataModule
    from lora_sam3d.data.cache import BuildInterrupted
    from lora_sam3d.data.dataset import cache_dataset
    from lora_sam3d.settings.old_keys import upgrade

    if args.config:
        config = yaml.safe_load(Path(args.config).read_text()) or {}
        data = upgrade(config.get("data") or {}, "data", f"config {args.config}")
        if not data.get("root") or not data.get("classes"):
            raise ValueError(f"config {args.config} has no data.root and data.classes: give a fit config")
    elif args.root and args.classes:
        data = {"root": args.root, "classes": args.classes}
    else:
        raise ValueError("cache --build needs --config <fit config>, or --root <data folder> with --classes")
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    data.pop("predict", None)  # the requests are not the cache's
    module = TSDataModule(**data)
    module.write_phantoms_if_empty()  # as fit would: a demo config on a fresh clone
    cases = module.settings.cases.find(module.root, module.classes, on_bad_case="skip")
    try:
        built, failed, _ = cache_dataset(
            cases, module.classes, module.settings, module.cache_dir, workers=args.workers, progress=True
        )
    except BuildInterrupted as stop:
        labelled = sum(1 for c in cases if _has_entry(module.cache_dir, c.case_id))
        done = (  # a case is cached once its labels and its image are; the images are cut last
            f"{labelled} of {len(cases)} cases' labels cached, no image cut yet"
            if stop.what.startswith("caching")
            else f"the labels of {labelled} of {len(cases)} cases and {stop.finished} of {stop.total} images cut"
        )
        print(
            f"lora-sam3d: interrupted while {stop.what}: {done} in {module.cache_dir} (finished entries "
            "kept); run the same command again to build the rest",
            file=sys.stderr,
        )
        return 130
    size = sum(f.stat().st_size for c in built.values() for d in (c.path, c.image_dir) for f in d.iterdir())
    print(
        f"{len(built)} of {len(cases)} cases cached in {module.cache_dir} ({size / 2**20:.1f} MiB)"
        + (f"; {len(failed)} failed: {', '.join(sorted(failed))}" if failed else "")
    )
    return 1 if failed else 0


def _has_entry(cache_dir: Path, case_id: str) -> bool:
    """Whether a finished labels entry of ``case_id`` is in the cache (any class list or settings)."""
    from lora_sam3d.data.cache import is_built

    return any(is_built(p) for p in cache_dir.glob(f"{case_id}-*"))


def _view(args: argparse.Namespace) -> int:
    if not Path(args.scan).exists():
        raise FileNotFoundError(
            f"view: scan {args.scan} does not exist (a .nii/.nii.gz file or a DICOM folder)"
        )
    try:
        from lora_sam3d.viewer.app import main as view
    except ImportError as err:
        print(f"lora-sam3d: error: view needs napari and Qt ({err.name} is missing): "
              "pip install 'lora-sam3d[napari]'", file=sys.stderr)  # fmt: skip
        return 2
    return view(args.scan, args.model)


def _cache(args: argparse.Namespace) -> int:
    import time

    from lora_sam3d.data.cache import IN_USE_S, cache_entries, remove_entry

    if args.build:
        return _build_cache(args)
    if not (args.root or args.cache_dir):
        raise ValueError("cache needs --root or --cache-dir (or --build)")
    folder = Path(args.cache_dir) if args.cache_dir else Path(args.root) / ".cache"
    entries = cache_entries(folder)
    cutoff = time.time() - args.unused_days * 86400 if args.unused_days is not None else None
    total = removed = 0
    now = time.time()
    for e in entries:
        unused = cutoff is not None and e.last_used < cutoff
        in_use = now - e.last_used < IN_USE_S and not e.path.name.startswith(".")
        remove = ((args.stale and e.stale is not None) or unused) and not in_use
        why = e.stale or (f"unused for {args.unused_days:g}+ days" if unused else "")
        if in_use and ((args.stale and e.stale) or unused):
            why += f" (kept: read by a run in the last {IN_USE_S:g} s)"
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        action = ("would remove" if args.dry_run else "removed") if remove else "kept"
        what = "(image, shared)" if e.kind == "image" else ",".join(e.classes) or "-"
        print(f"{action:12} {e.name}  {e.size_bytes / 2**20:8.1f} MiB  used {stamp}  {what}  {why}".rstrip())
        total += e.size_bytes
        if remove:
            removed += e.size_bytes
            if not args.dry_run:
                remove_entry(e)
    verb = "would free" if args.dry_run else "freed"
    print(f"{len(entries)} entries, {total / 2**20:.1f} MiB in {folder}; {verb} {removed / 2**20:.1f} MiB")
    return 0


def _add_cache(sub: Any) -> None:
    """``cache``: list, build or clean the preprocessed-case cache."""
    ca = sub.add_parser(
        "cache", help="list the preprocessed-case cache; remove stale or unused entries only when asked"
    )
    where = ca.add_mutually_exclusive_group()
    where.add_argument("--root", help="data folder (its cache is <root>/.cache)")
    where.add_argument("--cache-dir", help="the cache folder itself (data.cache_dir)")
    ca.add_argument(
        "--build",
        action="store_true",
        help="build the missing entries of a data set: the data "
        "section of --config (a fit config), or --root with --classes",
    )
    ca.add_argument("--config", help="with --build: a fit config; its data section says what to cache")
    ca.add_argument("--classes", nargs="+", help="with --build --root: the structures to cache")
    ca.add_argument("--workers", type=int, default=1, help="with --build: cases built at once (processes)")
    ca.add_argument(
        "--stale",
        action="store_true",
        help="remove entries whose source files changed or are gone, "
        "of an older cache format, or left by a killed build",
    )
    ca.add_argument("--unused-days", type=float, help="remove entries no run has used for this many days")
    ca.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    ca.set_defaults(run=_cache)


def _add_view(sub: Any) -> None:
    """``view SCAN [--model PATH]``: napari with the scan and the reconstruct widget (`lora_sam3d.viewer`)."""
    view = sub.add_parser(
        "view", help="draw in napari: the scan in world mm, a labels layer to paint, the reconstruct widget"
    )
    view.add_argument("scan", help="a NIfTI file (.nii, .nii.gz) or a DICOM series folder")
    view.add_argument(
        "--model", default="builtin:relative_shapes",
        help="builtin:relative_shapes (default), an adapter folder or a .ckpt checkpoint",
    )  # fmt: skip
    view.set_defaults(run=_view)


def _extra_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-sam3d",
        description="LoRA fine-tuning of SAM 3D Objects' mesh decoder on medical volumes.",
        epilog="Training: lora-sam3d {fit,validate,test,predict} --config configs/demo.yaml (see --help of each).",
    )
    parser.add_argument("--version", action="version", version=f"lora-sam3d {__version__}")
    sub = parser.add_subparsers(
        dest="command", metavar="{fit,validate,test,predict,phantoms,export,cache,view}"
    )
    ph = sub.add_parser("phantoms", help="write synthetic CT phantoms (NIfTI, TotalSegmentator layout)")
    ph.add_argument("--root", required=True, help="output folder")
    ph.add_argument("--kind", choices=("heart", "shapes", "hard_shapes", "abdomen"), default="heart")
    ph.add_argument("--layout", choices=("totalsegmentator", "cropped"), default="totalsegmentator")
    ph.add_argument("--n-cases", type=int, default=12)
    ph.add_argument("--shape", type=int, nargs=3, default=(96, 96, 64), metavar=("X", "Y", "Z"))
    ph.add_argument("--spacing", type=float, nargs=3, default=(1.6, 1.6, 2.5), metavar=("SX", "SY", "SZ"))
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--workers", type=int, default=1, help="cases written at once (processes; same files)")
    ph.add_argument(
        "--modality",
        choices=("ct", "mr", "mixed"),
        default="ct",
        help="mr: MR-like images, mri.nii.gz; mixed: every second case MR (read with modality auto)",
    )
    ph.set_defaults(run=_phantoms)
    ex = sub.add_parser(
        "export", help="merge a checkpoint's or an adapter's LoRA: decoder-merged.safetensors (+ adapter/)"
    )
    ex.add_argument(
        "--ckpt_path", help="a trained checkpoint (its adapter is merged and written as adapter/)"
    )
    ex.add_argument(
        "--adapter", help="or an adapter folder (e.g. one of model.finetune.adapters): merged on its base"
    )
    ex.add_argument("--output", required=True, help="output folder")
    ex.set_defaults(run=_export)
    _add_cache(sub)
    _add_view(sub)
    return parser


def _is_pipe(stream: TextIO) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # a replaced stream (tests, notebooks)
        return False


def _is_devnull(stream: TextIO) -> bool:
    try:
        now, null = os.fstat(stream.fileno()), os.stat(os.devnull)
    except (OSError, ValueError, AttributeError):
        return False
    return (now.st_dev, now.st_ino) == (null.st_dev, null.st_ino)


def _show_log() -> None:
    """The package's own log lines (how each scan was read, ...) on stderr, as Lightning's are shown."""
    log = logging.getLogger("lora_sam3d")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def main(argv: list[str] | None = None) -> int:
    explicit = argv is not None
    argv = list(argv) if explicit else sys.argv[1:]
    try:
        if argv and argv[0] in TRAINER_COMMANDS:
            _check_yaml(argv)
            _show_log()
            was_pipe = _is_pipe(sys.stdout)
            try:
                _lightning_cli(argv if explicit else None)
            except SystemExit as exit_:
                # rich's progress bar meets a closed pipe (`predict ... | head -1`) by pointing stdout at
                # /dev/null and exiting 1; every output is written by then: the exit of a closed pipe
                if exit_.code == 1 and was_pipe and _is_devnull(sys.stdout):
                    return 141
                raise
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
            return 0
        parser = _extra_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        code = args.run(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:  # `lora-sam3d cache ... | head`: the reader is gone, nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("lora-sam3d: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, TypeError, FloatingPointError, argparse.ArgumentError) as err:
        if os.environ.get("LORA_SAM3D_DEBUG"):
            raise
        print(f"lora-sam3d: error: {error_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
