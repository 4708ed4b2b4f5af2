"""Frozen config dataclasses built from plain mappings (YAML, JSON, a checkpoint's asdict, a Tune
trial's config): the one route from a mapping to a config, for ModelConfig, GanConfig and the
platform's TrainConfig alike.

Every key must be a field, and every value of its field's type: bool, int, float, str, an
optional one (``int | None``), ``tuple[int, ...]`` (a YAML list), or a nested config dataclass
(a mapping, built the same way). Ints are accepted where floats are; numbers must be finite and
ints within MAX_INT (no count, size or seed is larger, and a larger one would fail, or run for
ever, long after the config was accepted). A wrong key or value is a ValueError whose message
starts with its dotted key (``model.width: ...``); the dataclass's own ``__post_init__`` then
checks ranges and combinations, naming the field the same way.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from bonescan_model.errors import quoted

T = TypeVar("T")
MAX_INT = 2**31 - 1


def from_mapping(cls: type[T], d: Mapping[str, Any], *, prefix: str = "") -> T:
    """``cls(**d)`` with every key known and every value typed as its field says.
    prefix: the dotted path of ``d`` itself in an enclosing config (``"model."``)."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{prefix.rstrip('.') or cls.__name__}: must be a mapping of keys to values, "
                         f"got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in d.items():
        if key not in known:
            raise ValueError(f"{prefix}{key}: unknown key; known keys: {', '.join(sorted(known))}")
        values[key] = _typed(f"{prefix}{key}", value, hints[key])
    return cls(**values)


def _typed(key: str, value: Any, hint: Any) -> Any:
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        try:
            return from_mapping(hint, value, prefix=f"{key}.")
        except ValueError as err:  # the nested config's own checks name their field, not its place
            raise ValueError(str(err) if str(err).startswith(f"{key}") else f"{key}: {err}") from None
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _typed(key, value, hint)
    if typing.get_origin(hint) is tuple:  # tuple[int, ...]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {type(value).__name__} {quoted(value)}")
        return tuple(_typed(key, v, args[0]) for v in value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise ValueError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {quoted(value)}")
    if hint is int and abs(value) > MAX_INT:
        raise ValueError(f"{key}: {value} is out of range (at most {MAX_INT})")
    if hint is float:
        value = float(value) if abs(value) <= 1e300 else math.inf  # a huge int: too large for a float
        if not math.isfinite(value):
            raise ValueError(f"{key}: must be a finite number, got {quoted(value)}")
    return value
