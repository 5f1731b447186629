"""Problem/answer data: one ``Example`` type, what a row may hold, and ``load_examples`` for any source.

Contract
--------
- ``Example(problem, answer, solution=None, id="", images=(), system=None, columns={})``: frozen. ``answer`` is a
  ``str``, or a ``tuple`` of str when several forms are accepted (any one matching counts), or None where no
  answer is needed (flow pretraining). Numbers become strings. ``system`` is the system turn of the prompt (None:
  the template's own; "": none). ``columns`` holds the row's other columns as read (what reward functions get as
  keyword arguments, ``rlfr.reward.functions``).
- ``Fields``: which columns hold the prompt, answer, solution and images, and what to do with a bad row.
- ``load_examples(spec, prompt_field=..., ..., subset=None, split=None) -> Examples`` (``read_examples(spec,
  fields, subset, split)`` with the options as one ``Fields``): a .jsonl / .json file
  (``rlfr.data.jsonfiles``), a .csv / .parquet file, a saved dataset, a dataset directory laid out as on the Hub
  or a Hub dataset id (``rlfr.data.tables``). A missing column is an error naming the source, the column asked
  for (and its ``data.*`` key) and the columns found. A bad row (invalid JSON, not an object, wrong type, empty
  prompt) raises ``DataError`` naming the source, the 1-based row (and line for text files) and the column; so
  does a row that is valid JSON but too deeply nested or holds an integer too long for Python to read. With
  ``skip_bad_rows`` bad rows are skipped, logged with a warning, and counted in the returned list's ``report``.
- Chat rows: a prompt column holding a list of ``{"role", "content"}`` messages (``data.prompt_field=messages``,
  ``rlfr.data.chat``): the user turn(s) are the prompt, a system turn is the row's ``system`` (over
  ``data.system_prompt``), a last assistant turn is the solution (then ``data.solution_field`` is not read).
- Images (multimodal rows): ``image_field="auto"`` reads the column ``images`` or ``image`` when a row has one
  (both in one row is an error), ``"none"`` ignores images, any other name must be present in every row. What a
  cell may hold: ``rlfr.data.images``; paths are relative to the data file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rlfr.data.chat import is_chat, parse_chat
from rlfr.data.images import IMAGE_FIELDS, read_images
from rlfr.data.jsonfiles import JSON_SUFFIXES, json_rows
from rlfr.data.tables import open_table
from rlfr.errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    problem: str
    answer: str | tuple[str, ...] | None
    solution: str | None = None
    id: str = ""
    # decoded RGB PIL images (multimodal rows); left out of ==/hash: images are compared through their rows
    images: tuple = field(default=(), compare=False, repr=False)
    system: str | None = None  # the prompt's system turn: None = the template's own, "" = none
    columns: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Fields:
    """Which columns hold what (the ``data.*_field`` keys), and what to do with a bad row."""

    prompt: str = "problem"
    answer: str = "answer"
    solution: str | None = None
    skip_bad_rows: bool = False
    max_problem_chars: int | None = None  # refuse longer prompts while reading, before any tokenizer runs
    image: str = "auto"  # the image column: auto (images or image), none, or a column name
    need_answer: bool = True  # False: the answer column is not read (flow pretraining needs none)
    system_prompt: str | None = None  # data.system_prompt: the system turn of rows that have none


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
    if hasattr(value, "tolist"):  # numpy scalars / arrays
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


def _missing(name: str, key: str, row: dict) -> DataError:
    return DataError(f"field {name!r} is missing (row has {sorted(row)}; {key} names the column)")


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


def to_example(row: Any, fields: Fields, base_dir: Path = Path(".")) -> Example:
    """Example from one row; raises DataError(message naming the column)."""
    if isinstance(row, Exception):
        raise row
    if not isinstance(row, dict):
        raise DataError(f"expected an object, got {type(row).__name__}")
    if fields.prompt not in row or row[fields.prompt] is None:
        raise _missing(fields.prompt, "data.prompt_field", row)
    problem, system, solution = row[fields.prompt], None, None
    if is_chat(problem):
        problem, system, solution = parse_chat(problem, fields.prompt)
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"field {fields.prompt!r} must be a non-empty string or a chat, got {problem!r:.80}")
    if fields.max_problem_chars is not None and len(problem) > fields.max_problem_chars:
        raise DataError(
            f"field {fields.prompt!r} has {len(problem):,} characters, more than any prompt of the allowed "
            f"length can hold ({fields.max_problem_chars:,}); raise data.max_prompt_tokens or drop the row"
        )
    answer = None
    if fields.need_answer:
        if fields.answer not in row or row[fields.answer] is None:
            raise _missing(fields.answer, "data.answer_field", row)
        try:
            answer = _to_answer(row[fields.answer])
        except TypeError as e:
            raise DataError(f"field {fields.answer!r}: {e}") from None
    if fields.solution and solution is None:
        if fields.solution not in row or row[fields.solution] is None:
            raise _missing(fields.solution, "data.solution_field", row)
        solution = row[fields.solution]
        if not isinstance(solution, str):
            raise DataError(f"field {fields.solution!r} must be a string, got {type(solution).__name__}")
    rid = row.get("id")
    if rid is None or (isinstance(rid, float) and math.isnan(rid)):
        rid = ""
    images: tuple = ()
    column = _image_column(row, fields.image)
    if column is not None:
        try:
            images = read_images(row[column], base_dir)
        except DataError as e:
            raise DataError(f"field {column!r}: {e}") from None
    read = {fields.prompt, column}
    columns = {k: v for k, v in row.items() if k not in read}
    return Example(problem=problem, answer=answer, solution=solution, id=str(rid), images=images,
                   system=system if system is not None else fields.system_prompt, columns=columns)  # fmt: skip


def _check_columns(label: str, columns: list[str], first: Any, fields: Fields) -> None:
    """A missing column of a table, named with the source and the columns it has (before any row is read)."""
    chat = is_chat(first) if first is not None else False
    wanted = [(fields.prompt, "data.prompt_field")]
    wanted += [(fields.answer, "data.answer_field")] if fields.need_answer else []
    wanted += [(fields.solution, "data.solution_field")] if fields.solution and not chat else []
    wanted += [(fields.image, "data.image_field")] if fields.image not in ("auto", "none") else []
    for name, key in wanted:
        if name not in columns:
            hint = (
                " (chat rows: data.prompt_field=messages)"
                if "messages" in columns and key == "data.prompt_field"
                else ""
            )
            raise DataError(f"{label}: no column {name!r} ({key}); its columns are {columns}{hint}")


def _rows(spec: str, fields: Fields, subset: str | None, split: str | None) -> tuple[str, Path, Iterator]:
    """(label, base directory of relative image paths, iterator of (location, row)) of any source."""
    path = Path(spec).expanduser()
    if path.suffix.lower() in JSON_SUFFIXES and path.is_file():
        return str(path), path.parent, json_rows(path)
    table = open_table(spec, subset, split)
    if len(table.rows):
        _check_columns(table.label, table.columns, table.rows[0].get(fields.prompt), fields)
    base = path if path.is_dir() else path.parent
    return table.label, base, ((table.location(i), row) for i, row in enumerate(table.rows, 1))


def load_examples(
    spec: str | Path,
    prompt_field: str = "problem",
    answer_field: str = "answer",
    solution_field: str | None = None,
    skip_bad_rows: bool = False,
    split: str | None = None,
    max_problem_chars: int | None = None,
    image_field: str = "auto",
    subset: str | None = None,
    need_answer: bool = True,
    system_prompt: str | None = None,
) -> Examples:
    """Examples from a file, a dataset directory or a Hub dataset id (module docstring; the arguments are the
    fields of ``Fields``). Rows without an ``id`` get ``<name>-<row index>``."""
    fields = Fields(prompt_field, answer_field, solution_field, skip_bad_rows, max_problem_chars, image_field,
                    need_answer, system_prompt)  # fmt: skip
    return read_examples(spec, fields, subset, split)


def read_examples(
    spec: str | Path, fields: Fields, subset: str | None = None, split: str | None = None
) -> Examples:
    """``load_examples`` with its columns and options as one ``Fields``."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.suffix.lower() in JSON_SUFFIXES and not path.exists():
        raise DataError(f"{spec}: no such file or directory")
    label, base_dir, rows = _rows(spec, fields, subset, split)
    report, out, stem = LoadReport(path=label), Examples(), path.stem or spec.rsplit("/", 1)[-1]
    for location, row in rows:
        report.rows += 1
        try:
            ex = to_example(row, fields, base_dir)
        except DataError as e:
            msg = f"{label}, {location}: {e}"
            if not fields.skip_bad_rows:
                raise DataError(msg) from None
            report.skipped += 1
            report.errors.append(msg)
            continue
        if not ex.id:
            ex = replace(ex, id=f"{stem}-{report.rows - 1}")
        out.append(ex)
    report.loaded = len(out)
    if report.skipped:
        logger.warning(
            "%s: skipped %d bad rows of %d (first: %s)", label, report.skipped, report.rows, report.errors[0]
        )
    out.report = report
    return out
