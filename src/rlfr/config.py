"""Typed configs: frozen dataclasses filled from defaults, YAML files and ``key=value`` overrides.

Contract:
- ``load_config(cls, path=None, overrides=())`` builds ``cls`` (a frozen dataclass, possibly nested) from, in
  this order, merged key by key (a nested key replaces only itself, never its whole section): the command's
  defaults (``cls()``; a class may compute them from what the user asked with a classmethod
  ``resolve_dict(user) -> dict``), the YAML file(s) at ``path`` (one path or a list, later files win) and the
  dotted overrides such as ``flow.reward.beta=0.02``. Override values are parsed as YAML scalars/lists
  (``modes=[token_post,token_pre]``); a scalar is accepted where a list is expected (``report_to=wandb``).
- Unknown keys are rejected with a "did you mean" (the closest valid dotted keys) and the list of valid ones,
  naming the file they came from; so is a key given twice in one file (naming it and its lines); values are
  checked against the field types (``Literal`` choices, bool/int/float/str, tuples, ``Optional``, nested
  dataclasses); each dataclass may define ``validate(self)`` for cross-field checks, run at load time.
- Every numeric field declares its allowed values, ``field_(..., range="(0, inf)")`` (``metadata["range"]``, a
  ``Range``); a value outside it, NaN or an infinity is refused naming the key and the range. ``validate(self)``
  holds only what one field's range cannot say (one key against another).
- ``validate_config(cfg)`` runs the same checks on a config built in Python rather than loaded.
- ``to_dict(cfg)`` gives plain data (for saving next to a run) and ``from_dict`` is its inverse;
  ``to_yaml(cfg)`` is the YAML that ``--show-config`` prints (every key, its help as a comment), valid input to
  ``load_config``; ``overrides_from(cfg, base)`` the ``key=value`` words that turn ``base`` into ``cfg``.
- Every field carries a help text in ``metadata["help"]`` (see ``field_(...)``); ``describe(cls)`` lists them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from rlfr.config_files import flat_keys, leaves, merge_dicts, parse_overrides, read_yaml, yaml_value
from rlfr.errors import ConfigError

__all__ = [
    "ConfigError", "Range", "describe", "from_dict", "load_config", "merge_dicts", "overrides_from",
    "parse_overrides", "to_dict", "to_yaml", "validate_config", "valid_keys",
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
        args = get_args(tp)
        variable = origin is list or not args or (len(args) == 2 and args[1] is Ellipsis)
        if variable and not isinstance(value, (list, tuple, dict)):
            value = [value]  # a scalar where a list is expected: a list of one (report_to=wandb)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
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
        raise ConfigError(_unknown_message([f"{prefix}.{u}" if prefix else u for u in unknown], cls, prefix))
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


def valid_keys(cls: type, prefix: str = "", sections: bool = True) -> list[str]:
    """Every dotted key of config class ``cls``, depth first: its settings and (``sections``) its sections."""
    hints, out = get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += [prefix + f.name] if sections else []
            out += valid_keys(hints[f.name], f"{prefix}{f.name}.", sections)
        else:
            out.append(prefix + f.name)
    return out


def _close(key: str, keys: list[str]) -> list[str]:
    """Up to three of ``keys`` that a misspelt ``key`` most likely meant: close names in its own section, then
    the same or a close name in another section (``lr`` -> ``policy.lr``, ``flow.lr``), then close whole keys
    (a misspelt section)."""
    section, _, leaf = key.rpartition(".")
    same = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == section]
    near = [
        f"{section}.{n}" if section else n for n in difflib.get_close_matches(leaf, same, n=2, cutoff=0.7)
    ]
    near += [k for k in keys if difflib.get_close_matches(leaf, [k.rpartition(".")[2]], cutoff=0.8)]
    near += difflib.get_close_matches(key, keys, n=2, cutoff=0.85)
    return list(dict.fromkeys(near))[:3]


def _unknown_message(unknown: list[str], cls: type, prefix: str, root: type | None = None) -> str:
    """'unknown key(s) ... (did you mean ...?) in <section>; valid keys: ...' for dotted ``unknown`` keys of the
    section ``cls`` at ``prefix``; suggestions come from every key of ``root`` (default: the section's)."""
    keys = (
        valid_keys(root, sections=False)
        if root is not None
        else valid_keys(cls, f"{prefix}." if prefix else "", False)
    )
    named = []
    for u in unknown:
        near = _close(u, keys)
        named.append(repr(u) + (f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""))
    where = f" in '{prefix}'" if prefix else ""
    fields = sorted(f.name for f in dataclasses.fields(cls))
    return f"unknown key(s) {', '.join(named)}{where}; valid keys: {', '.join(fields)}"


def _check_known(cls: type, data: dict[str, Any], root: type, prefix: str = "") -> None:
    """Refuse keys of ``data`` that ``cls`` (the section at ``prefix`` of ``root``) does not have."""
    hints = get_type_hints(cls)
    unknown = sorted(k for k in data if k not in hints)
    if unknown:
        raise ConfigError(_unknown_message([prefix + u for u in unknown], cls, prefix[:-1], root))
    for k, v in data.items():
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            _check_known(hints[k], v, root, f"{prefix}{k}.")


def _source_of(message: str, sources: list[tuple[str, dict]]) -> str:
    """The file that set the key an error message starts with (the last one that did), or ''."""
    m = re.match(r"[A-Za-z_][\w.]*", message)
    key = m[0].rstrip(".") if m else ""
    for name, data in reversed(sources):
        if any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in flat_keys(data)):
            return name
    return ""


def load_config(
    cls: type[T],
    path: str | Path | typing.Sequence[str | Path] | None = None,
    overrides: typing.Iterable[str] = (),
) -> T:
    """The command's defaults, then the YAML file(s) at ``path``, then dotted overrides, merged key by key ->
    validated ``cls`` instance (module docstring)."""
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    sources = [(str(p), read_yaml(p)) for p in paths] + [("", parse_overrides(overrides))]
    user: dict[str, Any] = {}
    for name, data in sources:
        try:
            _check_known(cls, data, cls)
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}" if name else str(e)) from e
        user = merge_dicts(user, data)
    resolve = getattr(cls, "resolve_dict", None)
    data = resolve(user) if callable(resolve) else merge_dicts(to_dict(cls()), user)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        name = _source_of(str(e), sources)
        raise ConfigError(f"{name}: {e}" if name else str(e)) from e


def _yaml_lines(cfg: Any, indent: int) -> list[str]:
    lines, pad = [], "  " * indent
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        note = f.metadata.get("help", "") + (f" ({f.metadata['range']})" if "range" in f.metadata else "")
        if dataclasses.is_dataclass(value):
            lines += [f"{pad}{f.name}:  # {note}", *_yaml_lines(value, indent + 1)]
        else:
            lines.append(f"{pad}{f.name}: {yaml_value(to_dict(value))}  # {note}")
    return lines


def to_yaml(cfg: Any) -> str:
    """Every key of config ``cfg`` with its value and, as a comment, its help text and range: what
    ``--show-config`` prints, and valid input to ``load_config`` (``--config``)."""
    return "\n".join(_yaml_lines(cfg, 0)) + "\n"


def overrides_from(cfg: Any, base: Any) -> list[str]:
    """The ``key=value`` words that turn config ``base`` into ``cfg`` (the keys whose values differ)."""
    new, old = to_dict(cfg), to_dict(base)

    a, b = leaves(new), leaves(old)
    return [f"{k}={yaml_value(v)}" for k, v in a.items() if b.get(k, object()) != v]


def describe(cfg: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf field of config ``cfg`` (an instance: its values are the defaults
    shown; a class: ``cls()``), for ``--help`` style listings; the help ends with a numeric field's range."""
    cfg = cfg() if isinstance(cfg, type) else cfg
    rows = []
    for f in dataclasses.fields(cfg):
        key, value = f"{prefix}{f.name}", getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe(value, prefix=key + "."))
            continue
        note = f.metadata.get("help", "") + (f" ({f.metadata['range']})" if "range" in f.metadata else "")
        rows.append((key, yaml_value(to_dict(value)), note))
    return rows


def add_config_arguments(parser, example: str) -> None:
    """For a command that still parses its own arguments (an entry of ``rlfr.cli._COMMANDS`` without a config
    class): ``--config`` (repeatable), ``--show-config`` and the ``key=value`` words."""
    parser.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    parser.add_argument(
        "--show-config", action="store_true", help="print the resolved configuration and exit"
    )
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")


def config_from_args(args, cls: type[T], extra_overrides: typing.Iterable[str] = ()) -> T | None:
    """The config of such a command; with ``--show-config`` print it (``to_yaml``) and return None."""
    cfg = load_config(cls, args.config, [*args.overrides, *extra_overrides])
    if args.show_config:
        print(to_yaml(cfg), end="")
        return None
    return cfg
