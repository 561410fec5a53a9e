"""Checkpoint and adapter files: reading them safely, writing them atomically, finding shipped ones.

`AtomicCheckpointIO` writes Lightning checkpoints beside their final name, syncs, then renames.
Lightning's own `TorchCheckpointIO` writes through an fsspec transaction whose temporary file lives
in the system temp folder; when that folder is on another filesystem than the checkpoints (a
node's local /tmp vs a shared volume, the usual case on clusters) the final step is a copy into
the final name, so a run killed during that copy leaves a truncated ``last.ckpt`` that
``--ckpt_path last`` then picks up. Writing the temporary file in the checkpoint folder and
renaming it there is atomic on every POSIX filesystem. The temporary name starts with a dot, so
Lightning's search for ``last*.ckpt`` never takes it for a checkpoint. The `lora-sam3d` command
installs it by default (``trainer.plugins``); Python users pass
``Trainer(plugins=[AtomicCheckpointIO()])``.

Reading: torch's errors for truncated files and for pickles that would run code become one
`ValueError` that names the file and says which it is (`unreadable`); `load_weights` reads a flat
tensor dict from safetensors or weights-only torch files; `resolve_checkpoint` maps
``builtin:<name>`` to the shipped base. Adapters: `save_module_adapter` / `load_module_adapter`
write and read both stages' adapters of a `LoRAMeshDecoderModule`.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lora_sam3d.atomic import atomic_write
from lora_sam3d.lora import has_lora, load_adapter, save_adapter

if TYPE_CHECKING:
    from lora_sam3d.module import LoRAMeshDecoderModule


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` for local paths whose saves are all-or-nothing (see the module docstring)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        if "://" in str(path):  # remote storage: leave it to fsspec's own transaction
            super().save_checkpoint(checkpoint, path)
            return
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if "://" not in str(path):
            require_file(path)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as err:
            raise unreadable(path, err) from err


READ_ERRORS = (RuntimeError, OSError, EOFError, pickle.UnpicklingError)
"""What torch.load raises for truncated, corrupt or code-carrying files (see `unreadable`)."""


def unreadable(path: str | os.PathLike[str], err: BaseException) -> ValueError:
    """A one-line error for a weights file that torch or safetensors could not read, saying why."""
    text = str(err)
    if "Weights only load failed" in text:
        reason = (
            "it holds Python objects beyond tensors and plain types, which could run code when "
            "unpickled; refused (torch.load weights_only=True). Re-save it as safetensors or tensors only"
        )
    else:
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        reason = f"truncated or corrupt? ({type(err).__name__}: {first[:200]})"
    return ValueError(f"cannot read checkpoint {path}: {reason}")


def require_file(path: str | os.PathLike[str], what: str = "checkpoint") -> Path:
    """``path`` as a `Path` if it is a file; otherwise a one-line error saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{what} {path} is a folder, expected a file (.ckpt or .safetensors; an adapter folder "
            "goes in model.adapter)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


def load_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a safetensors or (weights-only) torch checkpoint file."""
    path = require_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise unreadable(path, err) from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"checkpoint {path} does not hold a flat dict of tensors (nor one under 'state_dict')"
        )
    return dict(state)


def resolve_checkpoint(path: str) -> str:
    """``builtin:<name>`` -> the shipped ``lora_sam3d/assets/<name>.safetensors``; other paths unchanged."""
    if not path.startswith("builtin:"):
        return path
    from importlib.resources import files

    name = path.removeprefix("builtin:")
    found = files("lora_sam3d.assets") / f"{name}.safetensors"
    if not found.is_file():
        available = sorted(
            p.name.removesuffix(".safetensors")
            for p in files("lora_sam3d.assets").iterdir()
            if p.name.endswith(".safetensors")
        )
        raise FileNotFoundError(
            f"no shipped decoder {path!r}; available: {['builtin:' + a for a in available]}"
        )
    return str(found)


DESIGN = "coarse-to-fine-1"
"""Checkpoints carry this; those of the one-stage design (none) are refused with a clear error."""


def check_design(meta: dict[str, Any]) -> None:
    """Refuse a checkpoint's ``lora_sam3d`` section written by another model design, saying so."""
    if meta.get("design") != DESIGN:
        raise ValueError(
            "this checkpoint is from the earlier one-stage design (the decoder read a dense slice "
            "unprojection); the coarse-to-fine model (stage 1 + decoder on the active band) cannot "
            "use it: train again with this version"
        )


STRUCTURE_ADAPTER = "structure"
"""Sub-folder of an adapter folder holding stage 1's adapter (or ``structure.safetensors``, full weights)."""


MODEL_SETTINGS = ("decoder", "structure", "base_checkpoint", "latent_encoder", "active_margin")
"""The `LoRAMeshDecoderModule` arguments an adapter folder's `MODEL_FILE` stores: the model it was trained with."""

MODEL_FILE = "model.json"
"""In an adapter folder: the model it was trained with (classes, decoder and stage-1 sizes, base) and
its data settings, so the folder alone can predict."""


def read_model_file(directory: str | Path) -> dict[str, Any]:
    """An adapter folder's `MODEL_FILE` ({} for folders written before it existed)."""
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def save_module_adapter(module: LoRAMeshDecoderModule, directory: str | Path) -> Path:
    """The decoder's adapter in PEFT's layout at ``directory`` (loadable onto the decoder alone), and
    stage 1's beside it: its LoRA adapter in ``structure/``, or its full weights when trained fully."""
    from safetensors.torch import save_file

    out = Path(directory)
    save_adapter(module.decoder, out, modules_to_save=module.hparams.unfreeze or [],
                 base_model_name_or_path=module.hparams.base_checkpoint)  # fmt: skip
    settings = {"decoder": module.decoder_config, "structure": module.structure_config}
    model = {
        "classes": module.classes,
        **{k: settings.get(k, module.hparams.get(k)) for k in MODEL_SETTINGS},
        "data": module.data_contract,
    }
    text = json.dumps(model, indent=2)
    atomic_write(out / MODEL_FILE, lambda tmp: tmp.write_text(text))
    if has_lora(module.structure):
        save_adapter(module.structure, out / STRUCTURE_ADAPTER)
    elif module.uses_structure and module.hparams.structure_finetune == "full":
        tensors = {k: v.detach().contiguous() for k, v in module.structure.state_dict().items()}
        atomic_write(out / f"{STRUCTURE_ADAPTER}.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    return out


def load_module_adapter(module: LoRAMeshDecoderModule, directory: str | Path) -> None:
    """Load what `save_module_adapter` wrote into both stages."""
    from safetensors.torch import load_file

    src = Path(directory)
    load_adapter(module.decoder, src)
    stored = read_model_file(src)
    if stored.get("data"):
        module.data_contract = stored["data"]
    if (src / STRUCTURE_ADAPTER).is_dir():
        load_adapter(module.structure, src / STRUCTURE_ADAPTER)
    elif (src / f"{STRUCTURE_ADAPTER}.safetensors").is_file():
        module.structure.load_state_dict(load_file(str(src / f"{STRUCTURE_ADAPTER}.safetensors")))
    elif module.uses_structure:
        raise FileNotFoundError(
            f"{src} holds no stage-1 adapter ({STRUCTURE_ADAPTER}/ or {STRUCTURE_ADAPTER}.safetensors): "
            "it was written by the one-stage design or for precomputed latents"
        )
