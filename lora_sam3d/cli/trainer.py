"""The training half of the `lora-sam3d` command: a LightningCLI over the module and the data module.

A YAML file is the whole experiment (`configs/demo.yaml`). The data module's resolution is linked
from the decoder's and its class list to the model's, so the two cannot disagree. Outside ``fit``,
a model that carries its own settings (``--ckpt_path``, ``model.finetune.adapter``, ``model.finetune.adapters``)
defines itself: the stored model settings, classes and preprocessing replace what the config
leaves at its defaults (read by `lora_sam3d.models.adapters.files.read_adapter_settings`).
Checkpoints are written by `AtomicCheckpointIO` unless the config names other ``trainer.plugins``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from lora_sam3d.cli.errors import error_line
from lora_sam3d.data import DataError, TSDataModule
from lora_sam3d.data.settings import PREPROCESSING_SETTINGS, DataSettings
from lora_sam3d.io.weights import READ_ERRORS, require_file, unreadable
from lora_sam3d.models.adapters.files import AdapterSettings, read_adapter_settings
from lora_sam3d.models.adapters.manifest import Manifest
from lora_sam3d.models.reconstructor import TINY_DECODER
from lora_sam3d.settings.old_keys import DATA_KEYS, get_path, upgrade, upgrade_argv
from lora_sam3d.training.callbacks import SaveConfigOnStart
from lora_sam3d.training.module import LoRAMeshDecoderModule

__all__ = ["LoRASAM3DCLI", "adopt_data_settings", "decoder_resolution", "run"]


def decoder_resolution(decoder: dict[str, Any] | None) -> int:
    return int({**TINY_DECODER, **(decoder or {})}["resolution"])


def adopt_data_settings(
    data_cfg: Any, stored: dict[str, Any], source: str, set_keys: frozenset[str] = frozenset()
) -> None:
    """Outside ``fit``, the stored preprocessing defines how scans are read: a setting the config
    leaves at its default takes the stored value (so ``config.yaml`` says what ran); one the config
    sets to another value is refused, naming both, since the model was trained on the stored one.
    A model that reads scans relative to the marked tissue is given the scan's units asked for
    (``modality``, ``ct_window_hu``; ``set_keys``: the data keys the command line or a config file
    sets, so a value equal to the default is obeyed too). ``stored`` is a `DataContract` dict;
    its keys' places in the data section are `DATA_KEYS`."""
    defaults = DataSettings().to_dict()
    trained = stored.get("views") or 1  # models written before several views existed saw one
    asked = data_cfg.get("views.count") or 1  # a request's slices are counted once their masks are read
    if asked > trained:
        raise ValueError(
            f"{asked} views asked (data.views.count) but {source} was trained with at most {trained} "
            f"view{'s' if trained > 1 else ''}: ask for {trained} or fewer, or train with data.views.count: {asked}"
        )
    for key in PREPROCESSING_SETTINGS:
        if key not in stored or stored[key] is None:
            continue
        path = DATA_KEYS[key]
        given, want, default = (
            _plain(data_cfg.get(path)),
            _plain(stored[key]),
            _plain(get_path(defaults, path)),
        )
        if given == want:
            continue
        given_here = given != default or path in set_keys  # a default nobody asked for is not refused
        if key in SCAN_UNITS and stored.get("context_reading") == "relative" and given_here:
            continue  # a relative reader reads another modality or window through its own statistics
        if given_here:
            raise ValueError(
                f"data.{path} is {given!r} but {source} was trained with {want!r}: a model reads scans the way "
                f"it was trained; remove data.{path} from the config or command line"
            )
        data_cfg[path] = want


SCAN_UNITS = ("modality", "ct_window_hu")
"""The stored settings that only set the scan's absolute units: a model that reads the scan
relative to the marked tissue (``data.context.reading: relative``) may be given others."""


def _plain(value: Any) -> Any:
    """Lists and tuples compare as lists."""
    return list(value) if isinstance(value, list | tuple) else value


def _as_plain(value: Any) -> Any:
    """A parsed setting as plain Python: a jsonargparse namespace as its dict."""
    return value.as_dict() if hasattr(value, "as_dict") else value


class LoRASAM3DCLI(LightningCLI):
    """LightningCLI with the links, the stored settings of checkpoints and adapters, and one-line errors."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.classes", "model.classes")
        parser.link_arguments("model.decoder", "data.frame.resolution", compute_fn=decoder_resolution)

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path``'s hyper-parameters define the model (as LightningCLI's own reading, whose
        few lines this replaces): those of the flat layout are moved to the tree first, and a file
        torch cannot read gets our one-line error instead of a traceback."""
        path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        if path and path not in ("last", "best", "hpc", "registry") and "://" not in str(path):
            require_file(path)
        self._stored_classes, self._stored_data = None, None
        if not (path and Path(path).is_file()):
            return
        cfg = self.config[self.config.subcommand]
        base_given = cfg.model.get("base.checkpoint")
        try:
            hparams = self._read_checkpoint(path)
        except READ_ERRORS as err:
            raise unreadable(path, err) from err
        if hparams:
            self._check_against(cfg.model, hparams, path)
            self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)
        cfg = self.config[self.config.subcommand]
        if base_given and base_given != cfg.model.get("base.checkpoint"):
            cfg.model["base.checkpoint"] = base_given  # the config points to a moved base

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """LightningCLI's parsing, keeping the command line's own options (`_check_against` reads them)."""
        given = sys.argv[1:] if args is None else args
        options = [a.partition("=")[0][2:] for a in given if isinstance(a, str) and a.startswith("--")]
        self._given = [a for a in options if a.startswith("model.")]
        self._given_data = {a.removeprefix("data.") for a in options if a.startswith("data.")}
        super().parse_arguments(parser, args)

    def _asked_data_keys(self, cfg: Any) -> frozenset[str]:
        """The data keys (``preprocessing.modality``, ...) the command line or a config file sets."""
        asked = set(getattr(self, "_given_data", ()))
        for path in cfg.get("config") or []:
            try:
                tree = yaml.safe_load(Path(str(path)).read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(tree, dict) and isinstance(tree.get("data"), dict):
                asked |= set(flatten(tree["data"]))
        return frozenset(asked)

    def _check_against(self, model: Any, hparams: dict[str, Any], path: str) -> None:
        """A model setting that contradicts ``--ckpt_path``'s own: refused when the command line gives
        it (the user asked for it), a warning naming it when a config file does (the checkpoint's
        value is used: the weights were trained with it)."""
        stored = {k: v for k, v in flatten(hparams).items() if k != "classes"}
        defaults = self._subcommand_parsers[self.config.subcommand].get_defaults().model
        for key, value in stored.items():
            given, default = _plain(_as_plain(model.get(key))), _plain(_as_plain(defaults.get(key)))
            if given is None or given == _plain(value):
                continue
            line = [
                g
                for g in getattr(self, "_given", [])
                if f"model.{key}" == g or f"model.{key}".startswith(g + ".")
            ]
            if line:
                raise ValueError(
                    f"--{line[0]} asks for model.{key}: {given!r} but the checkpoint {path} was trained with "
                    f"{value!r}: a checkpoint defines its model; drop --{line[0]} (to read no scan, "
                    "--data.context.source none), or train a model with it"
                )
            if given != default:  # a config file's own value, not a default nobody asked for
                warnings.warn(
                    f"model.{key} is {given!r} in the config but {value!r} in the checkpoint {path}: the "
                    "checkpoint's value is used (its weights were trained with it)",
                    stacklevel=2,
                )

    def _read_checkpoint(self, path: str) -> dict[str, Any]:
        """A checkpoint's manifest (its data contract and classes, kept for `_adopt_stored`) and its
        model hyper-parameters (in the tree's layout; Lightning's own keys left out)."""
        try:
            ckpt = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as err:  # torch raises KeyError, UnpicklingError... for non-checkpoints
            raise unreadable(path, err) from err
        manifest = Manifest.of_checkpoint(ckpt, f"checkpoint {path}")
        self._stored_data = (manifest.data, f"the checkpoint {path}")
        self._stored_classes = manifest.classes or None
        hparams = dict(ckpt.get("hyper_parameters") or {})
        hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
        return upgrade(hparams, "model", warn=False)

    def instantiate_classes(self) -> None:
        """A model built from settings stored in an adapter's model.json says so when it fails."""
        try:
            super().instantiate_classes()
        except (ValueError, KeyError) as err:
            source = getattr(self, "_settings_source", "")
            if not source or isinstance(err, DataError):  # data errors name their own files
                raise
            raise type(err)(
                f"{error_line(err).split(': ', 1)[1]} (the model settings come from {source})"
            ) from err

    def before_instantiate_classes(self) -> None:
        """A model that carries its own settings defines itself: outside ``fit``, ``model.finetune.adapter``
        (or ``model.finetune.adapters``) sets the base, decoder and stage-1 settings it was trained with;
        with ``--ckpt_path`` or an adapter, ``data.classes`` left out means the stored classes."""
        cfg = self.config[self.config.subcommand]
        adapters = list((cfg.model.get("finetune.adapters") or {}).values()) or [
            cfg.model.get("finetune.adapter")
        ]
        stored = [read_adapter_settings(f) for f in adapters if f]
        if self.config.subcommand != "fit":  # to train further, the config says what it trains
            self._adopt_stored(cfg, stored[0] if stored else None)
        # one run over several adapters: every class any of them covers
        from_adapters = list(dict.fromkeys(c for s in stored for c in s.classes))
        classes = cfg.data.get("classes") or getattr(self, "_stored_classes", None) or from_adapters
        if classes:
            cfg.data.classes = list(classes)
            cfg.model.classes = list(classes)

    def _adopt_stored(self, cfg: Any, stored: AdapterSettings | None) -> None:
        """The first adapter's model settings and the stored data settings (adapter, else checkpoint)."""
        model = stored.model if stored is not None else {}
        source = str(stored.model_file) if stored is not None else ""
        self._settings_source = source if model else ""
        for key, value in flatten(model).items():
            given = cfg.model.get(key)
            if not (key == "base.checkpoint" and given and given != value):
                cfg.model[key] = value
        if "decoder" in model:
            cfg.data["frame.resolution"] = decoder_resolution(model["decoder"])
        if stored is not None and stored.data:
            data, source = stored.data, source
        else:
            data, source = getattr(self, "_stored_data", None) or (None, "")
        if data:
            adopt_data_settings(cfg.data, data, source, self._asked_data_keys(cfg))
        base = cfg.model.get("base.checkpoint")
        if base and not base.startswith("builtin:") and not Path(base).is_file() and source:
            raise FileNotFoundError(
                f"base checkpoint {base} (the path stored in {source}) does not exist; if it moved, "
                "give its new path with --model.base.checkpoint"
            )


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"base": {"checkpoint": x}, "decoder": {...}}`` as ``{"base.checkpoint": x, "decoder": {...}}``:
    the groups of `MODEL_SETTINGS` set field by field (the decoder's and stage 1's dicts whole)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("decoder", "structure"):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def run(args: list[str] | None, model_class: type | None = None) -> None:
    """The LightningCLI over `LoRAMeshDecoderModule` (or a subclass with its arguments, e.g. a baseline);
    the flat keys of earlier versions on the command line or in a config are mapped (`upgrade_argv`)."""
    if args is None:  # the process's own command line: upgraded in place (LightningCLI reads it there)
        sys.argv[1:] = upgrade_argv(sys.argv[1:])
    else:
        args = upgrade_argv(list(args))
    LoRASAM3DCLI(
        model_class or LoRAMeshDecoderModule,
        TSDataModule,
        args=args,
        trainer_defaults={
            "plugins": [{"class_path": "lora_sam3d.training.checkpoint_io.AtomicCheckpointIO"}]
        },
        save_config_callback=SaveConfigOnStart,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "lora-sam3d", "exit_on_error": False},  # errors reach `main`: one line
    )
