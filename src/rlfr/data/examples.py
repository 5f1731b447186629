"""Problem/answer data: one ``Example`` type and the loader for data files.

Contract
--------
- ``Example(problem, answer, solution=None, id="")``: frozen. ``answer`` is a ``str``, or a ``tuple`` of
  str when several forms are accepted (any one matching counts). Numbers in files become strings.
- ``load_examples(path, ...) -> Examples``: reads .jsonl, .json (a list of objects), .csv, .parquet, or a
  directory written by ``datasets.save_to_disk``. A bad row (invalid JSON, not an object, missing field,
  wrong type, empty problem) raises ``DataError`` naming the file, the 1-based row (and line for text
  files) and the field; so does a row that is valid JSON but too deeply nested or holds an integer too long
  for Python to read. With ``skip_bad_rows=True`` bad rows are skipped, logged with a warning, and
  counted in the returned list's ``report`` (a ``LoadReport``). ``Examples`` is a plain ``list`` subclass,
  so callers who do not care about the report see a list. CSV cells are read as text (no NaN or number
  guessing), so list answers need .jsonl, .json, .parquet or a dataset directory.
- Images (multimodal rows): ``image_field="auto"`` (default) reads the column ``images`` or ``image`` when a
  row has one (both in one row is an error), ``image_field="none"`` ignores images, any other name must be
  present in every row. What a cell may hold: ``rlfr.data.images``; paths are relative to the data file. A
  missing or unreadable image is a bad row (``DataError`` naming file, row and field). ``Example.images``
  holds the decoded RGB images (``()`` for a text row).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlfr.data.images import IMAGE_FIELDS, read_images
from rlfr.errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    problem: str
    answer: str | tuple[str, ...]
    solution: str | None = None
    id: str = ""
    # decoded RGB PIL images (multimodal rows); left out of ==/hash: images are compared through their rows
    images: tuple = field(default=(), compare=False, repr=False)


@dataclass
class LoadReport:
    path: str
    rows: int = 0  # rows seen
    loaded: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # one message per skipped row


class Examples(list):
    """A list of Example with the ``LoadReport`` of the load that produced it."""

    report: LoadReport


def _to_answer(value: Any) -> str | tuple[str, ...]:
    if hasattr(value, "tolist"):  # numpy scalars / arrays from parquet
        value = value.tolist()
    if isinstance(value, bool) or value is None:
        raise TypeError(f"expected a string, number or list of them, got {value!r}")
    if isinstance(value, str):
        if not value.strip():
            raise TypeError("empty string")
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"non-finite number {value!r}")
        return str(value)
    if isinstance(value, (list, tuple)) and value:
        forms = tuple(_to_answer(v) for v in value)
        if any(isinstance(f, tuple) for f in forms):
            raise TypeError("nested lists are not answers")
        return forms
    raise TypeError(f"expected a string, number or non-empty list, got {type(value).__name__} {value!r}")


def _utf8_error(path: Path, raw: bytes, err: UnicodeDecodeError) -> DataError:
    line = raw.count(b"\n", 0, err.start) + 1
    return DataError(
        f"{path}, line {line}: not valid UTF-8 ({err.reason} at byte {err.start}); re-encode the file"
    )


def _text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, raw, e) from None


def _unreadable(e: Exception) -> str:
    """Why Python's JSON reader gave up on a value that is valid JSON (hostile shapes, not syntax)."""
    if isinstance(e, RecursionError):
        return "nested too deeply to read; an answer is a string, a number or a flat list of them"
    if "integer string conversion" in str(e):
        return "an integer with more digits than Python converts (sys.set_int_max_str_digits); write it as a string"
    return str(e).splitlines()[0]


def _json_items(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """The items of a ``.json`` file's top-level list, read one at a time, so that an item that cannot be
    read (too deeply nested, an integer too long) is named by its number and line."""
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
        yield f"item {item}", row
        pos = ws.match(text, pos).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
            if text.startswith("]", pos):  # "[1,]" is not JSON
                raise DataError(f"{path}: invalid JSON: a ',' before the closing ']'")
        elif not text.startswith("]", pos):
            raise DataError(f"{path}: invalid JSON after item {item}: expected ',' or ']'")
    if text[pos + 1 :].strip():
        raise DataError(f"{path}: invalid JSON: extra data after the top-level list")


_DATASET_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")


def _rows(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    """Yields (location, row dict or Exception) in file order; location is e.g. 'line 3'."""
    suffix = path.suffix.lower()
    if path.is_dir():
        if not any((path / m).is_file() for m in _DATASET_MARKERS):
            raise DataError(
                f"{path} is a directory but not a dataset saved with datasets.save_to_disk (it has none of "
                f"{list(_DATASET_MARKERS)}); give a .jsonl, .json, .csv or .parquet file"
            )
        try:
            import datasets  # lazy: optional (rlfr[data]); only a saved dataset directory needs it
        except ImportError as e:
            raise DataError(f"{path}: loading a saved dataset needs `pip install datasets`") from e
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                raise DataError(f"{path}: a DatasetDict with splits {list(ds)}; pass split=")
            if split not in ds:
                raise DataError(f"{path}: no split {split!r}; splits are {list(ds)}")
            ds = ds[split]
        for i, row in enumerate(ds, 1):
            yield f"row {i}", row
    elif suffix == ".jsonl":
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
    elif suffix == ".json":
        yield from _json_items(path, _text(path))
    elif suffix in (".csv", ".parquet"):
        try:
            import pandas as pd  # lazy: optional (rlfr[data]); only .csv / .parquet files need it
        except ImportError as e:
            raise DataError(f"{path}: loading {suffix} needs `pip install pandas pyarrow`") from e
        if suffix == ".csv":
            # Everything as text and no NaN guessing, so "007" stays "007" and an empty cell is "".
            df = pd.read_csv(io.StringIO(_text(path)), dtype=str, keep_default_na=False)
            offset = 1  # the header is line 1
        else:
            df = pd.read_parquet(path)
            offset = None
        for i, row in enumerate(df.to_dict(orient="records"), 1):
            yield (f"row {i} (line {i + offset})" if offset else f"row {i}"), row
    else:
        raise DataError(
            f"{path}: unsupported format {suffix!r}; use .jsonl, .json, .csv, .parquet or a dataset dir"
        )


def _image_column(row: dict, image_field: str) -> str | None:
    """The column holding this row's images (module docstring), or None."""
    if image_field == "none":
        return None
    if image_field != "auto":
        if image_field not in row:
            raise DataError(f"field {image_field!r} (data.image_field) is missing (row has {sorted(row)})")
        return image_field
    present = [f for f in IMAGE_FIELDS if f in row and row[f] is not None]
    if len(present) > 1:
        raise DataError(f"row has both {present}; choose one with data.image_field")
    return present[0] if present else None


def _parse_row(
    row: Any, problem_field: str, answer_field: str, solution_field: str | None, max_chars: int | None = None,
    image_field: str = "auto", base_dir: Path = Path("."),
) -> Example:  # fmt: skip
    """Example from one row; raises DataError(message naming the field)."""
    if isinstance(row, Exception):
        raise row
    if not isinstance(row, dict):
        raise DataError(f"expected an object, got {type(row).__name__}")
    for name in (problem_field, answer_field) + ((solution_field,) if solution_field else ()):
        if name not in row or row[name] is None:
            raise DataError(f"field {name!r} is missing (row has {sorted(row)})")
    problem = row[problem_field]
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"field {problem_field!r} must be a non-empty string, got {problem!r:.80}")
    if max_chars is not None and len(problem) > max_chars:
        raise DataError(
            f"field {problem_field!r} has {len(problem):,} characters, more than any prompt of the allowed "
            f"length can hold ({max_chars:,}); raise data.max_prompt_tokens or drop the row"
        )
    try:
        answer = _to_answer(row[answer_field])
    except TypeError as e:
        raise DataError(f"field {answer_field!r}: {e}") from None
    solution = None
    if solution_field:
        solution = row[solution_field]
        if not isinstance(solution, str):
            raise DataError(f"field {solution_field!r} must be a string, got {type(solution).__name__}")
    rid = row.get("id")
    if rid is None or (isinstance(rid, float) and math.isnan(rid)):  # missing id in a pandas column
        rid = ""
    images: tuple = ()
    column = _image_column(row, image_field)
    if column is not None:
        try:
            images = read_images(row[column], base_dir)
        except DataError as e:
            raise DataError(f"field {column!r}: {e}") from None
    return Example(problem=problem, answer=answer, solution=solution, id=str(rid), images=images)


def load_examples(
    path: str | os.PathLike,
    problem_field: str = "problem",
    answer_field: str = "answer",
    solution_field: str | None = None,
    skip_bad_rows: bool = False,
    split: str | None = None,
    max_problem_chars: int | None = None,
    image_field: str = "auto",
) -> Examples:
    """Examples from a file or saved dataset directory (see module docstring). Rows without an ``id``
    get ``<file stem>-<row index>``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    report = LoadReport(path=str(path))
    out = Examples()
    for location, row in _rows(path, split):
        report.rows += 1
        try:
            ex = _parse_row(row, problem_field, answer_field, solution_field, max_problem_chars, image_field,
                            path.parent if not path.is_dir() else path)  # fmt: skip
        except DataError as e:
            msg = f"{path}, {location}: {e}"
            if not skip_bad_rows:
                raise DataError(msg) from None
            report.skipped += 1
            report.errors.append(msg)
            continue
        if not ex.id:
            ex = Example(
                ex.problem, ex.answer, ex.solution, id=f"{path.stem}-{report.rows - 1}", images=ex.images
            )
        out.append(ex)
    report.loaded = len(out)
    if report.skipped:
        logger.warning(
            "%s: skipped %d bad rows of %d (first: %s)", path, report.skipped, report.rows, report.errors[0]
        )
    out.report = report
    return out
