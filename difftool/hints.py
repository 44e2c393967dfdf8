"""The config's field types: resolved once, and a value from YAML or `--set` checked against one.

YAML is loose where the config is not: `1e-4` reads as a string, `16` where a list is meant. `coerce`
is the whole of what is accepted and `type_name` how a refusal names the type.
"""

from __future__ import annotations

import functools
import types
import typing
from typing import Any


@functools.cache
def field_types(cls) -> dict[str, Any]:
    """A section's field types, resolved once: the annotations are strings (`from __future__ import
    annotations`), and resolving them for every field of every --set took a second per 20 overrides."""
    return typing.get_type_hints(cls)


def coerce(value: Any, hint) -> tuple[bool, Any]:
    """Check `value` against a type hint; ints pass as floats and lists as tuples."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return True, None
        for arg in args:
            if arg is type(None):
                continue
            ok, coerced = coerce(value, arg)
            if ok:
                return True, coerced
        return False, None
    if origin in (tuple, list):
        if value is None:
            return False, None
        if not isinstance(value, (list, tuple)):
            value = [value]  # `--set model.attention_resolutions=16` means (16,)
        (item_type, *_) = typing.get_args(hint)
        items = []
        for item in value:
            ok, coerced = coerce(item, item_type)
            if not ok:
                return False, None
            items.append(coerced)
        return True, origin(items)
    if hint is bool:
        return (True, value) if isinstance(value, bool) else (False, None)
    if hint is int:
        return (True, value) if isinstance(value, int) and not isinstance(value, bool) else (False, None)
    if hint is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, None
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return True, str(value)
        return False, None
    return False, None


def type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    if origin in (tuple, list):
        return f"a list of ({type_name(typing.get_args(hint)[0])})"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))
