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
    from lora_sam3d.models.reconstructor import TINY_DECODER

    return int({**TINY_DECODER, **(decoder or {})}["resolution"])


STORED_DATA_SETTINGS = ("spacing", "modality", "ct_window_hu", "frame_scale", "slice_size")
"""How a model was trained to read scans; a checkpoint or adapter stores them and predicting must match."""


def adopt_data_settings(data_cfg: Any, stored: dict[str, Any], source: str) -> None:
    """Outside ``fit``, the stored preprocessing defines how scans are read: a setting the config
    leaves at its default takes the stored value (so ``config.yaml`` says what ran); one the config
    sets to another value is refused, naming both, since the model was trained on the stored one."""
    from lora_sam3d.data.settings import DataSettings

    defaults = DataSettings()
    trained = stored.get("views") or 1  # models written before several views existed saw one
    asked = max(
        [data_cfg.get("views") or 1]
        + [len(i.get("slices") or [1]) for i in data_cfg.get("predict_items") or []]
    )
    if asked > trained:
        raise ValueError(
            f"{asked} views asked (data.views or a request's slices) but {source} was trained with at most "
            f"{trained} view{'s' if trained > 1 else ''}: ask for {trained} or fewer, or train with data.views: {asked}"
        )
    for key in STORED_DATA_SETTINGS:
        if key not in stored or stored[key] is None:
            continue
        given, want = data_cfg.get(key), stored[key]
        same = (
            list(given) == list(want)
            if isinstance(want, list | tuple) and given is not None
            else given == want
        )
        if same:
            continue
        default = getattr(defaults, key)
        is_default = (
            list(given) == list(default)
            if isinstance(default, list | tuple) and given is not None
            else given == default
        )
        if not is_default:
            raise ValueError(
                f"data.{key} is {given!r} but {source} was trained with {want!r}: a model reads scans the way "
                f"it was trained; remove data.{key} from the config or command line"
            )
        data_cfg[key] = list(want) if isinstance(want, list | tuple) else want


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


def _lightning_cli(args: list[str] | None, model_class: type | None = None) -> None:
    """LightningCLI over `LoRAMeshDecoderModule` (or a subclass with the same arguments, e.g. a baseline)."""
    import torch
    from lightning.pytorch.cli import LightningCLI

    from lora_sam3d.adapters import MODEL_FILE, MODEL_SETTINGS, read_model_file
    from lora_sam3d.callbacks import SaveConfigOnStart
    from lora_sam3d.checkpoint_io import check_design
    from lora_sam3d.data import TSDataModule
    from lora_sam3d.module import LoRAMeshDecoderModule
    from lora_sam3d.weights import READ_ERRORS, require_file, unreadable

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
            if path and path not in ("last", "best", "hpc", "registry") and "://" not in str(path):
                require_file(path)
            self._stored_classes, self._stored_data = None, None
            self._base_given = (
                self.config[self.config.subcommand].model.get("base_checkpoint") if path else None
            )
            try:
                if path and Path(path).is_file():  # before its hyper-parameters reach the parser
                    try:
                        ckpt = torch.load(path, weights_only=True, map_location="cpu")
                    except Exception as err:  # torch raises KeyError, UnpicklingError... for non-checkpoints
                        raise unreadable(path, err) from err
                    meta = ckpt.get("lora_sam3d")
                    if isinstance(meta, dict):
                        check_design(meta)
                        self._stored_data = (meta.get("data"), f"the checkpoint {path}")
                    self._stored_classes = ckpt.get("hyper_parameters", {}).get("classes")
                super()._parse_ckpt_path()
            except READ_ERRORS as err:
                raise unreadable(path, err) from err
            cfg = self.config[self.config.subcommand] if path else None
            if cfg is not None and self._base_given and self._base_given != cfg.model.get("base_checkpoint"):
                cfg.model.base_checkpoint = self._base_given  # the config points to a moved base

        def instantiate_classes(self) -> None:
            """A model built from settings stored in an adapter's model.json says so when it fails."""
            try:
                super().instantiate_classes()
            except (ValueError, KeyError) as err:
                from lora_sam3d.data import DataError

                source = getattr(self, "_settings_source", "")
                if not source or isinstance(err, DataError):  # data errors name their own files
                    raise
                raise type(err)(
                    f"{error_line(err).split(': ', 1)[1]} (the model settings come from {source})"
                ) from err

        def before_instantiate_classes(self) -> None:
            """A model that carries its own settings defines itself: outside ``fit``, ``model.adapter``
            (or ``model.adapters``) sets the base, decoder and stage-1 settings it was trained with;
            with ``--ckpt_path`` or an adapter, ``data.classes`` left out means the stored classes."""
            cfg = self.config[self.config.subcommand]
            folders = [
                f for f in list((cfg.model.get("adapters") or {}).values()) or [cfg.model.get("adapter")] if f
            ]
            models = [read_model_file(f) for f in folders]
            stored = dict(models[0]) if models else {}
            if len(models) > 1:  # one run over several adapters: every class any of them covers
                stored["classes"] = list(dict.fromkeys(c for m in models for c in m.get("classes", [])))
            if self.config.subcommand != "fit":  # to train further, the config says what it trains
                source = f"{Path(folders[0]) / MODEL_FILE}" if folders else ""
                self._settings_source = source if stored else ""
                for key in MODEL_SETTINGS:
                    given = cfg.model.get(key)
                    if key in stored and not (key == "base_checkpoint" and given and given != stored[key]):
                        cfg.model[key] = stored[key]
                if "decoder" in stored:
                    cfg.data.resolution = _decoder_resolution(stored["decoder"])
                data, source = (stored.get("data"), source) if stored.get("data") else (
                    getattr(self, "_stored_data", None) or (None, "")
                )  # fmt: skip
                if data:
                    adopt_data_settings(cfg.data, data, source)
                base = cfg.model.get("base_checkpoint")
                if base and not base.startswith("builtin:") and not Path(base).is_file() and source:
                    raise FileNotFoundError(
                        f"base checkpoint {base} (the path stored in {source}) does not exist; if it moved, "
                        "give its new path with --model.base_checkpoint"
                    )
            classes = (
                cfg.data.get("classes") or getattr(self, "_stored_classes", None) or stored.get("classes")
            )
            if classes:
                cfg.data.classes = list(classes)
                cfg.model.classes = list(classes)

    LoRASAM3DCLI(
        model_class or LoRAMeshDecoderModule,
        TSDataModule,
        args=args,
        trainer_defaults={"plugins": [{"class_path": "lora_sam3d.checkpoint_io.AtomicCheckpointIO"}]},
        save_config_callback=SaveConfigOnStart,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "lora-sam3d", "exit_on_error": False},  # errors reach `main`: one line
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
    from lora_sam3d.adapters import MODEL_SETTINGS, read_model_file
    from lora_sam3d.callbacks import save_adapter_of, save_merged_decoder
    from lora_sam3d.module import LoRAMeshDecoderModule
    from lora_sam3d.weights import READ_ERRORS, require_file, unreadable

    if (args.ckpt_path is None) == (args.adapter is None):
        raise ValueError("export needs --ckpt_path (a trained checkpoint) or --adapter (an adapter folder)")
    if args.adapter is not None:  # one adapter of several trained on one base: merged on its own
        stored = read_model_file(args.adapter)
        if not stored:
            raise FileNotFoundError(f"{Path(args.adapter) / 'model.json'} does not exist: export needs an "
                                    "adapter folder written by AdapterCheckpoint or export of this version")  # fmt: skip
        module = LoRAMeshDecoderModule(
            stored["classes"], adapter=args.adapter, **{k: stored[k] for k in MODEL_SETTINGS}
        )
        module.configure_adapters()
    else:
        ckpt = require_file(args.ckpt_path)
        try:
            module = LoRAMeshDecoderModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
        except READ_ERRORS as err:
            raise unreadable(ckpt, err) from err
    out = Path(args.output)
    written = [save_merged_decoder(module.model, out / "decoder-merged.safetensors")]
    if module.hparams.finetune == "lora" and args.adapter is None:
        written.append(save_adapter_of(module, out / "adapter"))
    for path in written:
        print(f"wrote {path}")


def _build_cache(args: argparse.Namespace) -> int:
    """``cache --build``: every case of a data set cached, ``--workers`` at once, with progress; a case
    that fails is named and skipped; a summary at the end; exit status 1 when any failed."""
    import yaml

    from lora_sam3d.data import TSDataModule
    from lora_sam3d.data.cases import discover_cases
    from lora_sam3d.data.dataset import cache_dataset

    if args.config:
        config = yaml.safe_load(Path(args.config).read_text()) or {}
        data = dict(config.get("data") or {})
        if not data.get("root") or not data.get("classes"):
            raise ValueError(f"config {args.config} has no data.root and data.classes: give a fit config")
    elif args.root and args.classes:
        data = {"root": args.root, "classes": args.classes}
    else:
        raise ValueError("cache --build needs --config <fit config>, or --root <data folder> with --classes")
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    data.pop("predict_items", None)
    module = TSDataModule(**data)
    module.write_phantoms_if_empty()  # as fit would: a demo config on a fresh clone
    s = module.settings
    cases = discover_cases(module.root, module.classes, s.layout, s.label_values, "skip")
    built, failed, _ = cache_dataset(
        cases, module.classes, s, module.cache_dir, workers=args.workers, progress=True
    )
    size = sum(f.stat().st_size for c in built.values() for d in (c.path, c.image_dir) for f in d.iterdir())
    print(f"{len(built)} of {len(cases)} cases cached in {module.cache_dir} ({size / 2**20:.1f} MiB)"
          + (f"; {len(failed)} failed: {', '.join(sorted(failed))}" if failed else ""))  # fmt: skip
    return 1 if failed else 0


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


def _extra_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-sam3d",
        description="LoRA fine-tuning of SAM 3D Objects' mesh decoder on medical volumes.",
        epilog="Training: lora-sam3d {fit,validate,test,predict} --config configs/demo.yaml (see --help of each).",
    )
    parser.add_argument("--version", action="version", version=f"lora-sam3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{fit,validate,test,predict,phantoms,export,cache}")
    ph = sub.add_parser("phantoms", help="write synthetic CT phantoms (NIfTI, TotalSegmentator layout)")
    ph.add_argument("--root", required=True, help="output folder")
    ph.add_argument("--kind", choices=("heart", "shapes"), default="heart")
    ph.add_argument("--layout", choices=("totalsegmentator", "cropped"), default="totalsegmentator")
    ph.add_argument("--n-cases", type=int, default=12)
    ph.add_argument("--shape", type=int, nargs=3, default=(96, 96, 64), metavar=("X", "Y", "Z"))
    ph.add_argument("--spacing", type=float, nargs=3, default=(1.6, 1.6, 2.5), metavar=("SX", "SY", "SZ"))
    ph.add_argument("--seed", type=int, default=0)
    ph.set_defaults(run=_phantoms)
    ex = sub.add_parser(
        "export", help="merge a checkpoint's or an adapter's LoRA: decoder-merged.safetensors (+ adapter/)"
    )
    ex.add_argument(
        "--ckpt_path", help="a trained checkpoint (its adapter is merged and written as adapter/)"
    )
    ex.add_argument("--adapter", help="or an adapter folder (e.g. one of model.adapters): merged on its base")
    ex.add_argument("--output", required=True, help="output folder")
    ex.set_defaults(run=_export)
    ca = sub.add_parser(
        "cache", help="list the preprocessed-case cache; remove stale or unused entries only when asked"
    )
    where = ca.add_mutually_exclusive_group()
    where.add_argument("--root", help="data folder (its cache is <root>/.cache)")
    where.add_argument("--cache-dir", help="the cache folder itself (data.cache_dir)")
    ca.add_argument("--build", action="store_true", help="build the missing entries of a data set: the data "
                    "section of --config (a fit config), or --root with --classes")  # fmt: skip
    ca.add_argument("--config", help="with --build: a fit config; its data section says what to cache")
    ca.add_argument("--classes", nargs="+", help="with --build --root: the structures to cache")
    ca.add_argument("--workers", type=int, default=1, help="with --build: cases built at once (processes)")
    ca.add_argument("--stale", action="store_true", help="remove entries whose source files changed or are gone, "
                    "of an older cache format, or left by a killed build")  # fmt: skip
    ca.add_argument("--unused-days", type=float, help="remove entries no run has used for this many days")
    ca.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    ca.set_defaults(run=_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    explicit = argv is not None
    argv = list(argv) if explicit else sys.argv[1:]
    try:
        if argv and argv[0] in TRAINER_COMMANDS:
            _check_yaml(argv)
            _lightning_cli(argv if explicit else None)
            return 0
        parser = _extra_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        return args.run(args) or 0
    except (OSError, ValueError, KeyError, TypeError, FloatingPointError, argparse.ArgumentError) as err:
        if os.environ.get("LORA_SAM3D_DEBUG"):
            raise
        print(f"lora-sam3d: error: {error_line(err)}", file=sys.stderr)
        return 2


_OS_OPERATIONS = {
    "mkdir": "create folder", "makedirs": "create folder", "open": "open", "_open_file": "open",
    "__init__": "open", "write_text": "write", "write_bytes": "write", "replace": "rename", "rename": "rename",
    "mkstemp": "create a temporary file in", "mkdtemp": "create a temporary folder in", "rmtree": "remove",
    "unlink": "remove", "utime": "stamp", "iterdir": "list", "stat": "read", "read_text": "read",
    "read_bytes": "read", "save": "write", "copyfile": "copy", "atomic_write": "write", "atomic_dir": "write",
}  # fmt: skip


def error_line(err: BaseException) -> str:
    """One line for an error: its type and message; an OS error says which operation failed on which
    path; an error raised in a DataLoader worker process reads as if raised here (torch wraps it as
    "Caught X in DataLoader worker process N" plus the worker's traceback)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        name, _, message = last.partition(": ")
        return f"{name.rsplit('.', 1)[-1]}: {message} (in a DataLoader worker)"
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        tb, frame = err.__traceback__, None
        while tb is not None:  # the innermost Python frame names the operation (mkdir, open, rename...)
            frame, tb = tb.tb_frame, tb.tb_next
        operation = _OS_OPERATIONS.get(frame.f_code.co_name, "use") if frame is not None else "use"
        target = f"{err.filename} -> {err.filename2}" if err.filename2 else str(err.filename)
        return f"{type(err).__name__}: cannot {operation} {target}: {err.strerror}"
    return f"{type(err).__name__}: {' '.join(text.split()) if chr(10) in text else text}"


if __name__ == "__main__":
    raise SystemExit(main())
