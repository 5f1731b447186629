"""YAML config files and ``key=value`` overrides as plain nested dicts (``rlfr.config`` types them).

- ``parse_overrides(["a.b=1", "c=[x,y]"])`` -> ``{"a": {"b": 1}, "c": ["x", "y"]}`` (values parsed as YAML);
- ``merge_dicts(base, extra)``: ``extra`` over ``base``, key by key in nested mappings;
- ``read_yaml(path)``: a file's top-level mapping, refusing a key given twice (naming it and its lines);
- ``yaml_value(v)``: one value in YAML's flow style, as it reads back;
- ``flat_keys(d)`` / ``leaves(d)``: the dotted keys of a nested dict's leaves / ``{dotted key: value}``.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml

from rlfr.errors import ConfigError


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


def read_yaml(path: str | Path) -> dict[str, Any]:
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
    return loaded


def flat_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of the leaves of a nested dict."""
    out = []
    for k, v in data.items():
        out += flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of a nested dict's leaves."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out


def yaml_value(value: Any) -> str:
    """One value in YAML's flow style, as it reads back (``1.0e-06``, ``[0.9, 0.95]``, ``null``, ``'1'``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False)
    return text.removesuffix("\n...\n").strip()
