"""Typed configs: frozen dataclasses filled from YAML plus ``key=value`` overrides.

Contract:
- ``load_config(cls, path=None, overrides=())`` builds ``cls`` (a frozen dataclass, possibly nested)
  from the YAML file at ``path`` (optional) and dotted overrides such as ``flow.reward.beta=0.02``.
  Override values are parsed as YAML scalars/lists (``modes=[token_post,token_pre]``).
- Unknown keys are rejected with the list of valid ones, and so is a key given twice in one file (naming it and
  its lines); values are checked against the field types
  (``Literal`` choices, bool/int/float/str, tuples, ``Optional``, nested dataclasses); each dataclass may
  define ``validate(self)`` for cross-field checks, run at load time.
- Every numeric field declares its allowed values, ``field_(..., range="(0, inf)")`` (``metadata["range"]``, a
  ``Range``); a value outside it, NaN or an infinity is refused naming the key and the range. ``validate(self)``
  holds only what one field's range cannot say (one key against another).
- ``validate_config(cfg)`` runs the same checks on a config built in Python rather than loaded.
- ``to_dict(cfg)`` gives plain data (for saving next to a run) and ``from_dict`` is its inverse.
- Every field carries a help text in ``metadata["help"]`` (see ``field_(...)``); ``describe(cls)`` lists them.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from rlfr.errors import ConfigError

__all__ = [
    "ConfigError", "Range", "describe", "from_dict", "load_config", "merge_dicts", "parse_overrides", "to_dict",
    "validate_config",
]  # fmt: skip

T = TypeVar("T")


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric setting (each item's, for a list): an interval in the usual notation,
    ``"[0, 1)"``, ``"(0, inf)"``, ``"(-inf, inf)"``; a float must also be finite (NaN and infinities are never
    allowed: an infinite timeout is no timeout, an infinite learning rate a NaN a step later)."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> Range:
        m = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^\]\s)]+)\s*([\])])\s*", text)
        if not m:
            raise ValueError(f"range {text!r} is not an interval such as '[0, 1)' or '(0, inf)'")
        return cls(float(m[2]), float(m[3]), m[1] == "[", m[4] == "]")

    def __contains__(self, x: float) -> bool:
        above = x >= self.low if self.low_closed else x > self.low
        below = x <= self.high if self.high_closed else x < self.high
        return not (isinstance(x, float) and not math.isfinite(x)) and above and below

    def __str__(self) -> str:
        low, high = (
            str(int(v)) if math.isfinite(v) and v.is_integer() else repr(v) for v in (self.low, self.high)
        )
        if math.isinf(self.low) and math.isinf(self.high):
            return "a finite number"
        if math.isinf(self.high):
            return f"{'>=' if self.low_closed else '>'} {low}"
        if math.isinf(self.low):
            return f"{'<=' if self.high_closed else '<'} {high}"
        return f"in {'[' if self.low_closed else '('}{low}, {high}{']' if self.high_closed else ')'}"


def field_(default: Any, help: str, range: str | None = None) -> Any:  # noqa: A002 - they read best at call sites
    """A dataclass field with a help text and, for a number, its ``Range`` (``"[0, 1)"``); lists, dicts and
    dataclasses are given as immutable defaults."""
    metadata = {"help": help} if range is None else {"help": help, "range": Range.parse(range)}
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _in_range(value: int | float, allowed: Range | None, key: str) -> int | float:
    if allowed is not None and value not in allowed:
        nonfinite = (
            isinstance(value, float) and not math.isfinite(value) and str(allowed) != "a finite number"
        )
        finite = " and finite" if nonfinite else ""
        raise ConfigError(f"{key} must be {allowed}{finite}, got {value!r}")
    return value


def _check_value(value: Any, tp: Any, key: str, allowed: Range | None = None) -> Any:
    """``value`` checked against type ``tp`` (and a number against ``allowed``), converted where YAML is loose."""
    origin = get_origin(tp)
    expected = f" {allowed}" if allowed is not None else ""
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: a value is required")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key, allowed)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {args}")
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(v, args[0], f"{key}[{i}]", allowed) for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(
                _check_value(v, a, f"{key}[{i}]", allowed) for i, (a, v) in enumerate(zip(args, value))
            )
        inner = args[0] if args else Any
        return tuple(_check_value(v, inner, f"{key}[{i}]", allowed) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer{expected}, got {value!r}")
        return _in_range(value, allowed, key)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number{expected}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number{expected}, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer of hundreds of digits
            value = math.copysign(math.inf, value)
        return _in_range(value, allowed, key)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and checking types."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in '{prefix}'" if prefix else ""
        raise ConfigError(
            f"unknown key(s) {', '.join(repr(prefix + '.' + u if prefix else u) for u in unknown)}{where}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _check_value(value, hints[name], key, fields[name].metadata.get("range"))
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field without default
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e
    _validate(obj, prefix)
    return obj


def _validate(cfg: Any, prefix: str) -> None:
    """``cfg.validate()`` (the checks between keys), its errors prefixed with where ``cfg`` sits."""
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(f"{prefix + ': ' if prefix else ''}{e}") from e


def validate_config(cfg: Any, prefix: str = "") -> None:
    """The checks ``from_dict`` makes, on a config dataclass built in Python (``FlowConfig(lr=...)``): every
    field's type and range, nested configs included, and each ``validate()``."""
    hints = get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        key, value = f"{prefix}.{f.name}" if prefix else f.name, getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate_config(value, key)
        else:
            _check_value(value, hints[f.name], key, f.metadata.get("range"))
    _validate(cfg, prefix)


def to_dict(cfg: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a config dataclass; tuples become lists."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: typing.Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x,y]"]`` -> nested dict with YAML-parsed values."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {e}") from e
        _set_dotted(out, key, value)
    return out


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, recursively for nested mappings (neither is modified)."""
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = merge_dicts(merged[k], v)
        else:
            merged[k] = v
    return merged


def _refuse_duplicate_keys(node: yaml.Node | None, path: Path, prefix: str = "") -> None:
    """A key given twice in one mapping of a YAML (or JSON) file is an error naming it and its lines: YAML
    and JSON readers silently keep the last value. (``<<`` merge keys may be overridden: that is their use.)"""
    if isinstance(node, yaml.MappingNode):
        seen: dict[object, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"{path}, line {line}: key '{prefix}{key}' is given twice (first at line {seen[key]}); keep one"
                )
            seen[key] = line
            _refuse_duplicate_keys(value_node, path, f"{prefix}{key}.")
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, path, f"{prefix[:-1]}[{i}].")


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """YAML file (optional) + dotted overrides -> validated ``cls`` instance."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            text = p.read_text()
            _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), p)
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        data = loaded
    data = merge_dicts(data, parse_overrides(overrides))
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from e


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf field, for ``--help`` style listings."""
    rows = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix=key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else "(required)"
        rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows


def add_config_arguments(parser, example: str) -> None:
    """The arguments every config-driven command shares: --config, --show-config, key=value overrides."""
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--show-config", action="store_true", help="list every key with its default and help")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")


def config_from_args(args, cls: type[T], extra_overrides: typing.Iterable[str] = ()) -> T | None:
    """The config of a command from ``--config`` and overrides; with ``--show-config`` print every key and
    return None."""
    if args.show_config:
        print_config_help(cls)
        return None
    return load_config(cls, args.config, [*args.overrides, *extra_overrides])


def print_config_help(cls: type) -> None:
    rows = describe(cls)
    width = max(len(k) for k, _, _ in rows) + 2
    for key, default, help_text in rows:
        print(f"{key:{width}s} {default:26s} {help_text}")
