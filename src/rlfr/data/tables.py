"""Every data source but JSON files, through Hugging Face ``datasets`` (its cache, its offline mode).

A *source* is one of
- a ``.csv`` or ``.parquet`` file (``load_dataset("csv" | "parquet", data_files=...)``; CSV cells are read as
  text: no number or NaN guessing, so ``"007"`` stays ``"007"`` and an empty cell is ``""``);
- a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``load_from_disk``);
- a directory laid out as a dataset repository on the Hub (``data/train-*.parquet``, ``*.jsonl``, a README with
  ``configs``: ``load_dataset(directory, subset, split=...)``), e.g. a clone of one;
- a Hub dataset id ``owner/name`` (``load_dataset(id, subset, split=...)``): downloaded once into the
  ``datasets`` cache (``HF_DATASETS_CACHE``); with ``HF_DATASETS_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) only the
  cache is read. JSON Lines and JSON files are read by ``rlfr.data.jsonfiles`` (why: its docstring).

Contract: ``open_table(spec, subset, split) -> Table``: the rows (a ``datasets.Dataset``), a label naming the
source in errors (``"owner/name (subset x, split train)"``), and how to name a row (``"row 3"``; ``"row 2 (line
3)"`` for a CSV file). A source that cannot be opened raises ``DataError`` saying what was tried and how to fix it;
for a Hub id also how to use a local copy instead.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlfr.errors import DataError

TABLE_SUFFIXES = (".csv", ".parquet")
SAVED_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")
_DATA_FILES = ("*.parquet", "*.jsonl", "*.json", "*.csv", "*.arrow")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Table:
    rows: Any  # datasets.Dataset
    label: str  # names the source in errors
    csv: bool = False  # rows are lines of a CSV file (row i is line i + 1)

    def location(self, i: int) -> str:
        """How to name row ``i`` (1-based) in an error."""
        return f"row {i} (line {i + 1})" if self.csv else f"row {i}"

    @property
    def columns(self) -> list[str]:
        return list(self.rows.column_names)


def is_hub_id(spec: str) -> bool:
    """``owner/name`` that is not a local path: what ``open_table`` sends to the Hub."""
    return bool(HUB_ID.fullmatch(spec)) and not Path(spec).exists()


def _where(subset: str | None, split: str | None) -> str:
    parts = [f"subset {subset}"] if subset else []
    return f" ({', '.join(parts + ([f'split {split}'] if split else []))})" if parts or split else ""


def _pick_split(ds, label: str, split: str | None):
    import datasets  # lazy: datasets takes a second to import; the embedded task never needs it

    if not isinstance(ds, datasets.DatasetDict):
        return ds
    if split is None:
        raise DataError(f"{label}: a DatasetDict with splits {list(ds)}; pass split= (data.split)")
    if split not in ds:
        raise DataError(f"{label}: no split {split!r}; splits are {list(ds)} (data.split)")
    return ds[split]


def _csv_file(path: Path):
    import datasets  # lazy: datasets takes a second to import; the embedded task never needs it

    try:
        with path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the file"
        ) from None
    if not header:
        raise DataError(f"{path}: empty CSV file (no header line)")
    text = datasets.Features({name: datasets.Value("string") for name in header})
    return datasets.load_dataset(
        "csv", data_files=str(path), split="train", features=text, keep_default_na=False, na_filter=False
    )


def _local(path: Path, subset: str | None, split: str | None) -> Table:
    import datasets  # lazy: datasets takes a second to import; the embedded task never needs it

    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".csv":
            return Table(_csv_file(path), str(path), csv=True)
        if suffix == ".parquet":
            return Table(datasets.load_dataset("parquet", data_files=str(path), split="train"), str(path))
        raise DataError(
            f"{path}: unsupported format {suffix!r}; use .jsonl, .json, .csv, .parquet, a dataset directory "
            "(save_to_disk, or laid out as on the Hub) or a Hub dataset id"
        )
    if any((path / m).is_file() for m in SAVED_MARKERS):
        return Table(_pick_split(datasets.load_from_disk(str(path)), str(path), split), str(path))
    if not any(next(path.rglob(p), None) for p in _DATA_FILES):
        raise DataError(
            f"{path} is a directory holding no data: not a dataset saved with datasets.save_to_disk (it has none "
            f"of {list(SAVED_MARKERS)}) and no data files ({', '.join(_DATA_FILES)}) as in a dataset repository; "
            "give a .jsonl, .json, .csv or .parquet file"
        )
    label = f"{path}{_where(subset, split)}"
    try:
        return Table(datasets.load_dataset(str(path), subset, split=split), label)
    except (ValueError, KeyError) as e:  # an unknown split or subset: datasets names the ones there are
        raise DataError(f"{label}: {e} (data.subset, data.split)") from None


def _hub(spec: str, subset: str | None, split: str | None) -> Table:
    import datasets  # lazy: datasets takes a second to import; the embedded task never needs it

    label = f"Hub dataset {spec}{_where(subset, split)}"
    try:
        return Table(datasets.load_dataset(spec, subset, split=split), label)
    except (ConnectionError, OSError) as e:
        offline = (
            " (offline mode: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set)"
            if datasets.config.HF_HUB_OFFLINE
            else ""
        )
        raise DataError(
            f"{label} cannot be loaded{offline}: {str(e).splitlines()[0]}. Download it once where the Hub can be "
            f"reached (it then stays in the datasets cache), or point at a local copy: a .jsonl / .parquet file "
            f"or a directory (save_to_disk, or a clone of the dataset repository) as data.train / data.eval, with "
            "data.prompt_field and data.answer_field naming its columns"
        ) from None
    except (ValueError, KeyError) as e:  # an unknown split or subset: datasets names the ones there are
        raise DataError(f"{label}: {e} (data.subset, data.split)") from None


def open_table(spec: str, subset: str | None = None, split: str | None = None) -> Table:
    """The rows of a local file or directory, or of a Hub dataset id (module docstring)."""
    path = Path(spec).expanduser()
    if path.exists():
        return _local(path, subset, split)
    if is_hub_id(spec):
        return _hub(spec, subset, split if split is not None else "train")
    raise DataError(
        f"{spec}: no such file or directory (and not a Hub dataset id, which looks like owner/name)"
    )
