"""Frozen config dataclasses rebuilt from plain mappings (a checkpoint's asdict, YAML, JSON)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def from_mapping(cls: type[T], d: Mapping[str, Any]) -> T:
    """``cls(**d)``, naming an unknown key instead of TypeError's bare argument message."""
    known = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        if key not in known:
            raise ValueError(f"{cls.__name__}: unknown key {key!r}; known keys: {sorted(known)}")
    return cls(**d)
