"""The configuration reference of the docs site, generated from the config dataclasses so it cannot drift.

Every command of ``rlfr.cli._COMMANDS`` with a config class (and the actions of ``rlfr data``) gets a section
with one table row per key: its dotted name, type, default, allowed range and help text, read from the fields'
types, defaults and metadata (``rlfr.config.field_``). ``mkdocs build`` runs it as a hook (``mkdocs.yml`` ->
``hooks:``), which adds the page ``reference/config.md`` to the site; ``python scripts/config_reference.py``
prints the page. ``tests/test_docs.py`` checks that the page lists every key of every command.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# document the tree the site is built from, not another installed rlfr
sys.path.insert(0, str(ROOT / "src"))

from rlfr.config import Range, to_dict  # noqa: E402
from rlfr.config_files import yaml_value  # noqa: E402

PAGE = "reference/config.md"


def commands() -> list[tuple[str, type, str]]:
    """(command words, config class, one-line description) for every configurable command, in the CLI's order;
    ``rlfr data`` contributes one entry per action (``data download``, ``data prepare``)."""
    from rlfr.cli import _COMMANDS, _config_class

    out = []
    for name, (module, spec, about, _flags) in _COMMANDS.items():
        if spec is not None:
            out.append((name, _config_class(name), about))
            continue
        actions = getattr(importlib.import_module(module), "ACTIONS", None)
        if not actions:
            raise RuntimeError(
                f"rlfr {name} has neither a config class nor ACTIONS: the reference cannot list it"
            )
        for action, cls in actions.items():
            out.append((f"{name} {action}", cls, about))
    return out


def type_name(tp) -> str:
    """A field's annotation as a reader writes it: ``int``, ``str | None``, ``"rlfr" | "rlvr"``, ``tuple[float, ...]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin is typing.Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in args)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def range_text(r: Range | None) -> str:
    """``Range`` in interval notation (``[0, 1)``, ``(0, inf)``); empty for a field without one."""
    if r is None:
        return ""

    def num(v: float) -> str:
        if math.isinf(v):
            return "-inf" if v < 0 else "inf"
        return str(int(v)) if v.is_integer() else repr(v)

    return f"{'[' if r.low_closed else '('}{num(r.low)}, {num(r.high)}{']' if r.high_closed else ')'}"


def rows(cfg, prefix: str = "") -> list[dict]:
    """One dict per key of config instance ``cfg`` (its values are the defaults), depth first: sections
    (``section: True``, with their help) and settings (type, default, range, help)."""
    hints, out = typing.get_type_hints(type(cfg)), []
    for f in dataclasses.fields(cfg):
        key, value = prefix + f.name, getattr(cfg, f.name)
        help_text = f.metadata.get("help", "")
        if dataclasses.is_dataclass(value):
            out.append({"key": key, "section": True, "help": help_text})
            out += rows(value, key + ".")
        else:
            default = yaml_value(to_dict(value))
            out.append({
                "key": key, "section": False, "type": type_name(hints[f.name]), "default": default,
                "range": range_text(f.metadata.get("range")), "help": help_text,
            })  # fmt: skip
    return out


def _cell(text: str) -> str:
    """Plain text in a table cell: a pipe would end the cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    """A code span in a table cell: the tables extension keeps its pipes (an escape would show)."""
    return f"`{text}`".replace("\n", " ") if text != "" else ""


def render() -> str:
    """The whole page (Markdown)."""
    lines = [
        "# Configuration reference",
        "",
        "Every key of every command, generated from the config dataclasses (`src/rlfr/schema.py`, "
        "`src/rlfr/commands.py`) each time the site is built. Set a key as a `key=value` word "
        "(`rlfr train policy.lr=1e-6`) or in a `--config` YAML file; `rlfr COMMAND --help` prints the same "
        "list and `--show-config` the resolved values. A range is an interval: `[` and `]` include the end, "
        "`(` and `)` exclude it; for a list the range applies to each item.",
        "",
    ]
    for name, cls, about in commands():
        lines += [
            f"## rlfr {name}",
            "",
            f"{_cell(about)}. Config class: `{cls.__module__}.{cls.__name__}`.",
            "",
        ]
        lines += ["| key | type | default | range | help |", "|---|---|---|---|---|"]
        for r in rows(cls()):
            if r["section"]:
                lines.append(f"| **`{r['key']}`** | section | | | {_cell(r['help'])} |")
            else:
                lines.append(
                    f"| `{r['key']}` | {_code(r['type'])} | {_code(r['default'])} | {_code(r['range'])} "
                    f"| {_cell(r['help'])} |"
                )
        lines.append("")
    return "\n".join(lines)


def on_files(files, config):
    """mkdocs hook: add the generated page to the site."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files


if __name__ == "__main__":
    print(render())
