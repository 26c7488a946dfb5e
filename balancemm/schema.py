"""Typed, validated dataclasses from plain mappings: the parsing every config section shares.

A section is a frozen dataclass. :func:`parse` builds it from a mapping read from YAML or JSON and
refuses unknown keys (with a close-match suggestion), wrong types and values out of the range a field
declares with :func:`rng`; ``0`` and ``false`` are real values. Epoch hyper-parameters take an epoch
number or a share of the protocol's length (:data:`EpochValue`).

Torch-free and below every registry, so the hyper-parameters of methods, datasets and encoders (in
:mod:`balancemm.catalog`) and the run config (:mod:`balancemm.config`) are built on it alike.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from balancemm.errors import ConfigError

T = TypeVar("T")

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 8, 8, 8, 8
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 120


def show(value: Any) -> str:
    """``value``'s repr for an error message, cut short: a value from a file may be of any size."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an integer too long to print (sys.get_int_max_str_digits)
        text = f"<a {type(value).__name__} too long to print>"
    return text if len(text) <= 300 else text[:297] + "..."


def rng(
    *, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None
) -> dict[str, float | None]:
    """Field metadata declaring an allowed numeric range: ``field(default=1, metadata=rng(ge=0))``."""
    return {"ge": ge, "gt": gt, "le": le, "lt": lt}


#: An epoch hyper-parameter: absolute (``10``, the original codes' unit) or relative to the
#: protocol's ``train.epochs`` (``"30%"``), so that a schedule acts within any protocol's length.
EpochValue = int | str

_RELATIVE_EPOCH = re.compile(r"^(\d+(?:\.\d+)?)%$")


def _parse_epoch(value: Any, path: str) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _RELATIVE_EPOCH.match(value.strip()) if isinstance(value, str) else None
    if match is None or float(match.group(1)) > 100:
        raise ConfigError(
            f"{path}: expected an epoch number or a share of train.epochs between '0%' and '100%', got {show(value)}"
        )
    return value.strip()


def epoch_meta(*, ge: int = 0) -> dict[str, Any]:
    """Field metadata for an :data:`EpochValue`: ``field(default=20, metadata=epoch_meta(ge=1))``;
    ``ge`` bounds the absolute form and, at run time, the resolved value."""
    return {**rng(ge=ge), "parse": _parse_epoch}


def resolve_epoch(value: int | str, total_epochs: int, *, ge: int = 0) -> int:
    """The epoch an :data:`EpochValue` means in a run of ``total_epochs``: ``"30%"`` of 30 is 9.

    Shares round half up and never go below ``ge`` (a period of ``"1%"`` in a 30-epoch run is 1, not 0).
    """
    if isinstance(value, int):
        return value
    share = float(value.rstrip("%")) / 100
    return max(ge, math.floor(share * total_epochs + 0.5))


def window_order(starts: int | str, ends: int | str, path: str) -> None:
    """Refuse a window that ends before it starts, when both ends use the same unit (mixed units can
    only be compared once the protocol's length is known, and an empty window then simply never acts)."""
    if type(starts) is not type(ends):
        return
    key = (lambda v: float(str(v).rstrip("%"))) if isinstance(starts, str) else int
    if key(ends) < key(starts):
        raise ConfigError(f"{path}.modulation_ends must be >= {path}.modulation_starts")


# ----------------------------------------------------------------------------------------------
# Strict parsing of plain mappings into dataclasses


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, path: str) -> Any:
    """``value`` as type ``tp`` (a Literal, Union, tuple, dataclass or scalar), or one clear ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            raise ConfigError(f"{path}: {show(value)} is not allowed; choose {_describe(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {show(value)} is not {_describe(tp)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected {_describe(tp)}, got {show(value)}")
        (item,) = (a for a in typing.get_args(tp) if a is not Ellipsis)
        return tuple(coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {show(value)}")
        return parse(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {show(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _check_range(value: Any, meta: Mapping[str, Any], path: str) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    tests = {
        "ge": (">=", lambda b: value >= b),
        "gt": (">", lambda b: value > b),
        "le": ("<=", lambda b: value <= b),
        "lt": ("<", lambda b: value < b),
    }
    if all(meta.get(k) is None or ok(meta[k]) for k, (_, ok) in tests.items()):
        return
    allowed = ", ".join(f"{word} {meta[k]}" for k, (word, _) in tests.items() if meta.get(k) is not None)
    raise ConfigError(f"{path}: {show(value)} is out of range; allowed: {allowed}")


def parse(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys, wrong types and bad ranges.

    A dataclass may define ``_parse(data, path)`` (a classmethod) to take over, e.g. when its schema
    depends on one of its values (an encoder's options depend on the encoder's name); a field may
    name its own parser in its metadata (``field(metadata={"parse": fn})``, ``fn(value, path)``).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of {cls.__name__} fields, got {show(data)}")
    custom = getattr(cls, "_parse", None)
    if custom is not None:
        return typing.cast(T, custom(data, path))
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            name = str(key)[:100]
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            allowed = ", ".join(fields) or "none"
            raise ConfigError(f"unknown config key {prefix}{name}{hint}; allowed keys: {allowed}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required config key {prefix}{name}")
            continue
        custom_field = f.metadata.get("parse")
        if custom_field is not None:
            value = custom_field(data[name], prefix + name)
        else:
            value = coerce(data[name], hints[name], prefix + name)
        _check_range(value, f.metadata, prefix + name)
        kwargs[name] = value
    obj = cls(**kwargs)
    check = getattr(obj, "_validate", None)
    if check is not None:
        check(path)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain JSON-able form of a config tree (tuples become lists)."""
    custom = getattr(obj, "_to_dict", None)
    if custom is not None:
        return custom()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


def resolve_name(registry: Any, name: str, path: str = "") -> str:
    """``registry.resolve(name)``, its error prefixed with ``path`` when given; a name too long to be a
    registered one is refused without being echoed whole."""
    where = f"{path}: " if path else ""
    if len(name) > 100:
        raise ConfigError(f"{where}{show(name)} is not a registered name; valid: {', '.join(registry.names())}")
    try:
        return str(registry.resolve(name))
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
