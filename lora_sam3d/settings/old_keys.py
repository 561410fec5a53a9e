"""The flat model keys of earlier versions and their places in today's settings tree.

Configs, command lines, checkpoints' hyper-parameters and adapter folders' ``model.json`` written
before the tree (``model.base_checkpoint``, ``model.lora.rank``, ``data.views: 3``, ``data.spacing``)
still load: `upgrade` moves each old key to its new place. A user's config or command line gets one
warning listing old -> new (they can fix it); stored files are upgraded silently (they cannot). A
key given both ways with different values is an error naming both. Written by hand: this is the
project's own history, no library knows it.
"""

from __future__ import annotations

import copy
import importlib
import importlib.abc
import importlib.util
import io
import sys
import warnings
from collections.abc import Mapping
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

__all__ = [
    "DATA_KEYS",
    "MODEL_KEYS",
    "MODULES",
    "OLD_PREFIXES",
    "MovedModules",
    "conflict_error",
    "first_layout",
    "get_path",
    "new_path",
    "upgrade",
    "upgrade_argv",
    "upgrade_config",
    "upgrade_state_dict",
    "upgraded_checkpoint",
]

MODEL_KEYS: dict[str, str] = {
    "base_checkpoint": "base.checkpoint",
    "base_seed": "base.seed",
    "reads_context": "context.read",
    "conditioning": "context.conditioning",
    "active_margin": "band.margin",
    "train_active": "band.train_on",
    "max_active_voxels": "band.max_voxels",
    "latent_encoder": "latents.encoder",
    "latents_dir": "latents.dir",
    "finetune": "finetune.mode",
    "structure_finetune": "finetune.structure_mode",
    "lora": "finetune.lora",
    "structure_lora": "finetune.structure_lora",
    "unfreeze": "finetune.unfreeze",
    "adapter_seed": "finetune.seed",
    "adapter": "finetune.adapter",
    "adapters": "finetune.adapters",
    "sdf_weight": "loss.sdf",
    "occupancy_weight": "loss.occupancy",
    "dice_weight": "loss.dice",
    "structure_weight": "loss.structure",
    "sdf_truncation": "loss.sdf_truncation",
    "nsd_tolerance_mm": "steps.nsd_tolerance_mm",
    "on_nonfinite": "steps.on_nonfinite",
}
"""``model.<old>`` -> ``model.<new>``; ``finetune`` is old when its value is not a mapping."""

DATA_KEYS: dict[str, str] = {
    "spacing": "preprocessing.spacing_mm",
    "modality": "preprocessing.modality",
    "ct_window_hu": "preprocessing.ct_window_hu",
    "resolution": "frame.resolution",
    "slice_size": "frame.slice_size",
    "frame_scale": "frame.scale",
    "extent_mm": "frame.extent_mm",
    "sdf_truncation_mm": "frame.sdf_truncation_mm",
    "coarse_target": "frame.coarse_target",
    "views": "views.count",
    "view_layout": "views.layout",
    "view_layouts": "views.layouts",
    "view_spacing_mm": "views.spacing_mm",
    "context": "context.source",
    "context_dropout": "context.dropout",
    "context_reading": "context.reading",
    "train_sampling": "sampling.train",
    "eval_sampling": "sampling.eval",
    "axes": "sampling.axes",
    "min_occupancy": "sampling.min_occupancy",
    "samples_per_class": "sampling.samples_per_class",
    "slices_per_axis": "sampling.slices_per_axis",
    "augment": "sampling.augment",
    "layout": "cases.layout",
    "label_values": "cases.label_values",
    "on_bad_case": "cases.on_bad_case",
    "phantoms": "cases.phantoms",
    "batch_size": "loader.batch_size",
    "num_workers": "loader.num_workers",
    "predict_items": "predict.items",
    "predict_split": "predict.split",
    "intensity_check": "predict.intensity_check",
}
"""``data.<old>`` -> ``data.<new>``; ``views`` and ``context`` are old when their value is not a
mapping. The stored `DataContract` keeps the old names (its keys map to the tree by this table)."""

SECTIONS = {"model": MODEL_KEYS, "data": DATA_KEYS}

MODULES: dict[str, str] = {
    "lora_sam3d.module": "lora_sam3d.training.module",
    "lora_sam3d.data.datamodule": "lora_sam3d.training.datamodule",
    "lora_sam3d.data_link": "lora_sam3d.training.data_link",
    "lora_sam3d.losses": "lora_sam3d.training.losses",
    "lora_sam3d.checkpoint_io": "lora_sam3d.training.checkpoint_io",
    "lora_sam3d.api": "lora_sam3d.predict.api",
    "lora_sam3d.predictions": "lora_sam3d.predict.records",
    "lora_sam3d.outputs": "lora_sam3d.predict.outputs",
    "lora_sam3d.writers": "lora_sam3d.predict.files",
    "lora_sam3d.report": "lora_sam3d.predict.report",
    "lora_sam3d.adapters": "lora_sam3d.models.adapters.bank",
    "lora_sam3d.models.adapter_files": "lora_sam3d.models.adapters.files",
    "lora_sam3d.models.manifest": "lora_sam3d.models.adapters.manifest",
    "lora_sam3d.latent": "lora_sam3d.models.latent",
    "lora_sam3d.trainer_cli": "lora_sam3d.cli.trainer",
    "lora_sam3d.errors": "lora_sam3d.cli.errors",
    "lora_sam3d.old_keys": "lora_sam3d.settings.old_keys",
    "lora_sam3d.config_tree": "lora_sam3d.settings.tree",
    "lora_sam3d.atomic": "lora_sam3d.io.atomic",
    "lora_sam3d.weights": "lora_sam3d.io.weights",
}
"""Modules of the flat layout -> where they live now: ``import lora_sam3d.module`` (a script, or a
stored config.yaml's ``class_path: lora_sam3d.checkpoint_io.AtomicCheckpointIO``) still works, with
a DeprecationWarning (`MovedModules`; the callbacks keep their path, `lora_sam3d.callbacks`)."""

OLD_PREFIXES = ("decoder.", "structure.")
"""State-dict prefixes of checkpoints written before the model moved under ``model.``."""


def new_path(section: str, key: str, value: Any = None, has_sub: bool = False) -> str | None:
    """The new place of ``<section>.<key>`` (its first segment), or None when it is not an old key.
    A key whose new place starts with its own name (``finetune``) is old only as a plain value."""
    table = SECTIONS.get(section, {})
    if key not in table:
        return None
    new = table[key]
    if new.split(".")[0] == key and (has_sub or isinstance(value, Mapping)):
        return None
    return new


def conflict_error(
    section: str, old: str, new: str, old_value: Any, new_value: Any, where: str
) -> ValueError:
    return ValueError(
        f"{where}: {section}.{old} (an earlier name of {section}.{new}) is {old_value!r} but "
        f"{section}.{new} is {new_value!r}: give {section}.{new} alone"
    )


def get_path(tree: Mapping[str, Any], path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = dict(child) if isinstance(child, Mapping) else {}
            node[part] = child
        node = child
    if isinstance(value, Mapping) and isinstance(node.get(last), Mapping):
        node[last] = {**value, **node[last]}  # the new spelling's own sub-keys win
    else:
        node[last] = value


def _moved(section: str, values: Mapping[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """``values`` with every old key at its new place, and the list of "old -> new" moves."""
    out = copy.deepcopy(dict(values or {}))
    moved = []
    # a plain value that becomes its own group's field (finetune: full -> finetune.mode) moves first,
    # so that the group it turns into is there for the keys moved into it (lora -> finetune.lora)
    table = SECTIONS.get(section, {})
    for key in sorted(out, key=lambda k: table.get(k, "").split(".")[0] != k):
        new = new_path(section, key, out[key])
        if new is None:
            continue
        value = out.pop(key)
        given = get_path(out, new)
        if given is not None and given != value and not isinstance(value, Mapping):
            raise conflict_error(section, key, new, value, given, where or section)
        _set(out, new, value)
        moved.append(f"{section}.{key} -> {section}.{new}")
    return out, moved


def _warn(where: str, moved: list[str]) -> None:
    if moved:
        warnings.warn(
            f"{where} uses the earlier flat keys {', '.join(moved)}: they still work; write the new "
            "ones (the settings tree of docs/configuration.md)",
            UserWarning,
            stacklevel=3,
        )


def upgrade(
    values: Mapping[str, Any] | None, section: str = "model", where: str = "", warn: bool = True
) -> dict[str, Any]:
    """``values`` (one section: the model's arguments) with every old key moved to its new place.

    ``warn``: one warning naming ``where`` and each old -> new (configs and command lines; stored
    files pass False). A key given both ways with different values is an error naming both."""
    out, moved = _moved(section, values or {}, where)
    if warn:
        _warn(where or section, moved)
    return out


def upgrade_config(config: Mapping[str, Any], where: str) -> tuple[dict[str, Any], bool]:
    """A whole config (``model:``, ``data:``... sections) upgraded, and whether anything moved (one
    warning for the file)."""
    out, moved = dict(config), []
    for section in SECTIONS:
        if isinstance(out.get(section), Mapping):
            out[section], more = _moved(section, out[section], where)
            moved += more
    _warn(where, moved)
    return out, bool(moved)


def upgrade_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Rename a checkpoint's ``decoder.*``/``structure.*`` keys (the module held both stages itself)
    to ``model.decoder.*``/``model.structure.*`` (the module holds the `Reconstructor`), in place."""
    for key in [k for k in state if k.startswith(OLD_PREFIXES)]:
        state[f"model.{key}"] = state.pop(key)
    return state


def upgraded_checkpoint(path: Any) -> Any:
    """A checkpoint file for Lightning's loader: the path itself, or, when its hyper-parameters use
    the flat keys, an in-memory copy with them moved to the tree (silently: the file is not the
    user's to edit)."""
    import torch

    if not isinstance(path, str | Path) or not Path(path).is_file():
        return path
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    hparams = ckpt.get("hyper_parameters") or {}
    if not any(new_path("model", k, v) for k, v in hparams.items()):
        return path
    ckpt["hyper_parameters"] = upgrade(hparams, "model", warn=False)
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    buffer.seek(0)
    return buffer


def upgrade_argv(argv: list[str]) -> list[str]:
    """Command-line options of the flat layout (``--model.lora.rank 16``, ``--model.reads_context
    false``) renamed to the tree's, with one warning for the command line; a config file with old
    keys is replaced by its upgraded text (jsonargparse reads YAML text given to ``--config``)."""
    out: list[str] = []
    moved: list[str] = []
    given: dict[str, tuple[str, str | None]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            out += [arg, _upgraded_config_arg(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            out.append("--config=" + _upgraded_config_arg(arg.split("=", 1)[1]))
            i += 1
            continue
        name, eq, inline = arg.partition("=")
        parts = name[2:].split(".") if name.startswith("--") else []
        if len(parts) >= 2 and parts[0] in SECTIONS:
            section, key, rest = parts[0], parts[1], parts[2:]
            value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else None)
            inline_mapping = (value or "").lstrip().startswith("{")  # --model.finetune '{mode: full}'
            new = new_path(section, key, None, has_sub=bool(rest) or inline_mapping)
            if new is not None:
                dotted = ".".join([section, new, *rest])
                moved.append(f"{name} -> --{dotted}")
                name = f"--{dotted}"
            full, spelled = name[2:], arg.partition("=")[0]
            if full in given and given[full][1] != value:
                raise ValueError(
                    f"the command line gives {given[full][0]} {given[full][1]} and {spelled} {value}, two "
                    f"values of one setting (--{full}): give --{full} once"
                )
            given[full] = (spelled, value)
            out.append(name + (eq + inline if eq else ""))
            i += 1
            continue
        out.append(arg)
        i += 1
    _warn("the command line", moved)
    return out


def _upgraded_config_arg(path: str) -> str:
    """A ``--config`` value: the file's path when it has no old key, else its upgraded YAML text."""
    file = Path(path)
    if not file.is_file():
        return path
    try:
        config = yaml.safe_load(file.read_text())
    except yaml.YAMLError:
        return path  # the command's own check reports it, naming the file
    if not isinstance(config, Mapping):
        return path
    new, changed = upgrade_config(config, f"config {path}")
    return yaml.safe_dump(new, sort_keys=False) if changed else path


def first_layout(stored: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of an unversioned manifest (version 1) in today's names: a checkpoint section (it
    has ``design``; the fine-tuning modes as strings beside the LoRA configs) or a ``model.json``
    (the groups at its top, maybe as flat keys; ``model`` holds every group, the caller keeps the
    model's settings)."""
    if "design" not in stored and "finetune" not in stored:  # model.json
        return {
            "classes": list(stored.get("classes") or []),
            "model": upgrade(stored, "model", warn=False),
            "data": stored.get("data"),
        }
    finetune = {
        "mode": stored.get("finetune"),
        "structure_mode": stored.get("structure_finetune"),
        "lora": stored.get("lora"),
        "structure_lora": stored.get("structure_lora"),
        "unfreeze": list(stored.get("unfreeze") or []),
    }
    model = {k: stored[k] for k in ("decoder", "structure") if k in stored}
    if stored.get("base_checkpoint") is not None:
        model["base"] = {"checkpoint": stored["base_checkpoint"]}
    return {
        "classes": [],
        "model": model,
        "finetune": finetune,
        "data": stored.get("data"),
        "base_fingerprint": stored.get("base_fingerprint"),
        "trainable": list(stored.get("trainable") or []),
        "design": stored.get("design"),
    }


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of a module of the flat layout (`MODULES`) give the module where it lives now, with a
    DeprecationWarning naming it; installed once by ``import lora_sam3d``."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname in MODULES else None

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {MODULES[spec.name]}: import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(MODULES[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """The module it gives is already imported."""

    @classmethod
    def install(cls) -> None:
        if not any(isinstance(f, cls) for f in sys.meta_path):
            sys.meta_path.append(cls())
