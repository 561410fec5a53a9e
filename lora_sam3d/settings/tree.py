"""Helpers of the settings tree (`lora_sam3d.models.config`, `lora_sam3d.data.settings`): a group
given as a dataclass, a YAML mapping or a checkpoint's dict becomes its dataclass in one place, with
an unknown key named."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

__all__ = ["coerce"]

T = TypeVar("T")


def coerce(cls: type[T], value: T | Mapping[str, Any] | None, where: str) -> T:
    """``value`` as a ``cls`` instance: an instance as is, a mapping (a YAML section, a checkpoint's
    dict) by its keys, None as the defaults; an unknown key is an error naming ``where``."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping of {cls.__name__} settings, got {value!r}")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{where} has no setting {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**value)
