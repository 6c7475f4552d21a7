"""YAML configs into dataclasses, refusing keys that do not exist.

A misspelt key silently falling back to a default is the most expensive bug a multi-day GPU
run can have, so every config file is checked field by field against its dataclass.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

from langcell.core.errors import LangCellError

T = TypeVar("T")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LangCellError(f"{path}: config file not found; pass an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise LangCellError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
    if not isinstance(data, dict):
        raise LangCellError(f"{path}: top level must be a mapping of keys to values")
    return data


def from_dict(cls: type[T], data: dict[str, Any], source: str, prefix: str = "") -> T:
    """Build dataclass `cls` from `data`; nested dataclass fields take nested mappings."""
    if not isinstance(data, dict):
        raise LangCellError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise LangCellError(f"{source}: unknown key '{prefix}{unknown[0]}'; valid keys here are "
                            f"{', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, source, f"{prefix}{name}.")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise LangCellError(f"{source}: {exc}") from None


def load_config(cls: type[T], path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> T:
    data = load_yaml(path)
    data.update(overrides or {})
    return from_dict(cls, data, str(path))


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
