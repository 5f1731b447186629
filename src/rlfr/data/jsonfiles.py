"""JSON Lines and JSON files, read row by row with the row's line number.

Why not ``datasets.load_dataset("json")`` for these two formats (it reads every other one, ``rlfr.data.tables``):
- it reads a whole block at a time, so a bad row is not named by its line and cannot be skipped;
- a column whose rows mix types (an answer that is ``"2"`` in one row, ``42`` in the next, a list in a third, as
  hand-written answer files do) becomes a JSON-typed column that re-parses strings: ``"1e5"`` comes back as
  ``100000.0``, ``"true"`` as ``True``; here every value is what the file says;
- a hostile row (nested 100,000 deep, an integer of 5,000 digits) must be an error naming its line, not a
  ``RecursionError`` or ``ValueError`` from inside a reader.

Contract: ``json_rows(path) -> Iterator[(location, row | DataError)]`` in file order, ``location`` being
``"line 3"`` (.jsonl) or ``"item 2 (line 4)"`` (.json: a top-level list of objects). A row that cannot be read is
yielded as a ``DataError`` (the caller decides whether to skip it); a file that is not a JSON list at all raises.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlfr.errors import DataError

JSON_SUFFIXES = (".jsonl", ".json")


def _unreadable(e: Exception) -> str:
    """Why Python's JSON reader gave up on a value that is valid JSON (hostile shapes, not syntax)."""
    if isinstance(e, RecursionError):
        return "nested too deeply to read; an answer is a string, a number or a flat list of them"
    if "integer string conversion" in str(e):
        return "an integer with more digits than Python converts (sys.set_int_max_str_digits); write it as a string"
    return str(e).splitlines()[0]


def _text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}, line {line}: not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the file"
        ) from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:  # line by line, so a bad byte names its line and can be skipped
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"line {lineno}", DataError(f"not valid UTF-8 ({e.reason} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {lineno}", DataError(f"invalid JSON ({e.msg} at column {e.colno})")
            except (RecursionError, ValueError) as e:
                yield f"line {lineno}", DataError(_unreadable(e))


def _json_items(path: Path) -> Iterator[tuple[str, Any]]:
    """The items of a ``.json`` file's top-level list, read one at a time, so that an item that cannot be
    read (too deeply nested, an integer too long) is named by its number and line."""
    text = _text(path)
    decoder, ws = json.JSONDecoder(), re.compile(r"\s*")
    pos = ws.match(text, 0).end()
    if not text.startswith("[", pos):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
        except (RecursionError, ValueError) as e:
            raise DataError(f"{path}: {_unreadable(e)}") from None
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    pos, item, line, counted = ws.match(text, pos + 1).end(), 0, 1, 0
    while not text.startswith("]", pos):
        item += 1
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
        except (RecursionError, ValueError) as e:
            raise DataError(f"{path}, item {item} (line {line}): {_unreadable(e)}") from None
        yield f"item {item} (line {line})", row
        pos = ws.match(text, pos).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
            if text.startswith("]", pos):  # "[1,]" is not JSON
                raise DataError(f"{path}: invalid JSON: a ',' before the closing ']'")
        elif not text.startswith("]", pos):
            raise DataError(f"{path}: invalid JSON after item {item}: expected ',' or ']'")
    if text[pos + 1 :].strip():
        raise DataError(f"{path}: invalid JSON: extra data after the top-level list")


def json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, row or DataError) of a .jsonl or .json file (module docstring)."""
    return _jsonl_rows(path) if path.suffix.lower() == ".jsonl" else _json_items(path)
