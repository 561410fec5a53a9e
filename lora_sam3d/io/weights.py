"""Weight files read safely: safetensors or weights-only torch files, one-line errors, shipped bases.

torch's errors for truncated files and for pickles that would run code become one `ValueError`
that names the file and says which it is (`unreadable`); `load_weights` reads a flat tensor dict;
`resolve_checkpoint` maps ``builtin:<name>`` to the base shipped in ``lora_sam3d/assets``. No
Lightning here: the model (`lora_sam3d.models`) reads its base through this module alone.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["READ_ERRORS", "load_weights", "require_file", "resolve_checkpoint", "unreadable"]

READ_ERRORS = (RuntimeError, OSError, EOFError, pickle.UnpicklingError)
"""What torch.load raises for truncated, corrupt or code-carrying files (see `unreadable`)."""


def unreadable(path: str | os.PathLike[str], err: BaseException) -> ValueError:
    """A one-line error for a weights file that torch or safetensors could not read, saying why."""
    text = str(err)
    head = _first_bytes(path)
    if (
        head is not None
        and not head.startswith((b"PK\x03\x04", b"\x80"))
        and not str(path).endswith(".safetensors")
    ):
        kind = (
            "text"
            if head and all(32 <= c < 127 or c in (9, 10, 13) for c in head)
            else "another kind of file"
        )
        return ValueError(
            f"cannot read checkpoint {path}: it is not a PyTorch checkpoint (neither a zip archive nor a "
            f"pickle; it looks like {kind})"
        )
    if "Weights only load failed" in text:
        reason = (
            "it holds Python objects beyond tensors and plain types, which could run code when "
            "unpickled; refused (torch.load weights_only=True). Re-save it as safetensors or tensors only"
        )
    else:
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        reason = f"truncated or corrupt? ({type(err).__name__}: {first[:200]})"
    return ValueError(f"cannot read checkpoint {path}: {reason}")


def _first_bytes(path: str | os.PathLike[str], n: int = 16) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return None


def require_file(path: str | os.PathLike[str], what: str = "checkpoint") -> Path:
    """``path`` as a `Path` if it is a file; otherwise a one-line error saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{what} {path} is a folder, expected a file (.ckpt or .safetensors; an adapter folder "
            "goes in model.finetune.adapter)"
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
