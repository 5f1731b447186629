"""The maths benchmark suite (AIME24/25, AMC23, MATH500, Minerva, OlympiadBench), read in place.

``BENCHMARKS`` and ``load_benchmark(name_or_path)``: a name is looked up as ``<name>.jsonl`` in
``$RLFR_BENCHMARK_DIR``, then ``../shared/data/benchmarks`` relative to the current directory, then
relative to the repository root (the parent of ``src/``). The files are read in place, never copied.
"""

from __future__ import annotations

import os
from pathlib import Path

from rlfr.data.examples import Examples, load_examples

BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")
_REPO_ROOT = Path(__file__).resolve().parents[3]


def benchmark_search_dirs() -> list[Path]:
    """Where ``load_benchmark`` looks for ``<name>.jsonl``, in order."""
    dirs = []
    if os.environ.get("RLFR_BENCHMARK_DIR"):
        dirs.append(Path(os.environ["RLFR_BENCHMARK_DIR"]))
    dirs += [
        Path.cwd().parent / "shared" / "data" / "benchmarks",
        _REPO_ROOT.parent / "shared" / "data" / "benchmarks",
    ]
    return dirs


def find_benchmark(name: str) -> Path:
    """Path of benchmark ``name`` (one of BENCHMARKS); FileNotFoundError lists what was searched."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    tried = [d / f"{name}.jsonl" for d in benchmark_search_dirs()]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"benchmark {name!r} not found; searched: {', '.join(map(str, tried))}. "
        "Set RLFR_BENCHMARK_DIR to the directory holding <name>.jsonl."
    )


def load_benchmark(name_or_path: str | os.PathLike) -> Examples:
    """A benchmark by name (see ``find_benchmark``) or by path to a file in a supported format."""
    if isinstance(name_or_path, str) and name_or_path in BENCHMARKS:
        return load_examples(find_benchmark(name_or_path))
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a benchmark name ({', '.join(BENCHMARKS)}) nor a path"
        )
    return load_examples(path)
