"""The maths benchmarks of the paper (AIME24/25, AMC23, MATH500, Minerva, OlympiadBench), from the Hub.

``BENCHMARKS`` maps each name to a public Hub dataset, its subset and split and the columns holding the problem
and the answer. ``rlfr data download NAME ...`` (``download``) fetches them into the ``datasets`` cache;
``data.eval=benchmark:NAME`` (or the bare name) reads them from there (``load_benchmark``), so with
``HF_DATASETS_OFFLINE=1`` a downloaded benchmark loads without the network, and one never downloaded is an
error naming the dataset id and how to use a local file instead.

``RLFR_BENCHMARK_DIR``: a directory of local copies, ``<name>.jsonl`` with ``problem`` and ``answer`` columns,
read instead of the Hub when set (an air-gapped cluster, a fixed copy for CI).

What the Hub copies hold (the paper does not name its sources; these are the usual public ones):
- aime24: ``HuggingFaceH4/aime_2024`` (train, 30 rows: AIME 2024 I and II);
- aime25: ``math-ai/aime25`` (test, 30 rows);
- amc23: ``AI-MO/aimo-validation-amc`` (train, 83 rows: AMC 12 2022-2023 with integer answers, stored as floats,
  "142.0"; the verifier compares numbers, so "142" matches);
- math500: ``HuggingFaceH4/MATH-500`` (test, 500 rows);
- minerva: ``math-ai/minervamath`` (test, 272 rows; the column is ``question``);
- olympiadbench: ``Hothan/OlympiadBench``, subset ``OE_TO_maths_en_COMP`` (open-ended, text-only, English maths
  competition problems; train, 674 rows; ``question``, and ``final_answer``, a list: any item matching counts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rlfr.data.examples import Examples, Fields, load_examples, read_examples
from rlfr.errors import DataError

PREFIX = "benchmark:"
ENV_DIR = "RLFR_BENCHMARK_DIR"


@dataclass(frozen=True)
class Benchmark:
    hub_id: str
    split: str
    prompt_field: str = "problem"
    answer_field: str = "answer"
    subset: str | None = None


BENCHMARKS: dict[str, Benchmark] = {
    "aime24": Benchmark("HuggingFaceH4/aime_2024", "train"),
    "aime25": Benchmark("math-ai/aime25", "test"),
    "amc23": Benchmark("AI-MO/aimo-validation-amc", "train"),
    "math500": Benchmark("HuggingFaceH4/MATH-500", "test"),
    "minerva": Benchmark("math-ai/minervamath", "test", prompt_field="question"),
    "olympiadbench": Benchmark(
        "Hothan/OlympiadBench", "train", "question", "final_answer", subset="OE_TO_maths_en_COMP"
    ),
}


def benchmark_name(spec: str) -> str | None:
    """The benchmark a data spec names (``benchmark:math500`` or ``math500``), or None; an unknown name after
    the prefix is an error listing the known ones."""
    name = spec.removeprefix(PREFIX)
    if name in BENCHMARKS:
        return name
    if spec.startswith(PREFIX):
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return None


def load_benchmark(name: str) -> Examples:
    """The rows of benchmark ``name``: the local copy under ``$RLFR_BENCHMARK_DIR`` when that is set, else the
    Hub dataset (from the ``datasets`` cache when it is there)."""
    b = BENCHMARKS[name]
    local = os.environ.get(ENV_DIR)
    if local:
        path = Path(local) / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(
                f"benchmark {name}: {path} does not exist ({ENV_DIR}={local} holds the local copies)"
            )
        return load_examples(path)
    fields = Fields(prompt=b.prompt_field, answer=b.answer_field)
    try:
        return read_examples(b.hub_id, fields, subset=b.subset, split=b.split)
    except DataError as e:
        raise DataError(f"benchmark {name}: {e}; fetch it with `rlfr data download {name}`") from None


def download(names: tuple[str, ...]) -> dict[str, int]:
    """Fetch the benchmarks ``names`` into the ``datasets`` cache (a no-op for those already there); -> rows
    per benchmark. Every row is read, so a benchmark whose columns moved fails here, not in an evaluation."""
    if os.environ.get(ENV_DIR):
        raise DataError(
            f"{ENV_DIR} is set, so benchmarks are read from local copies there; unset it to download"
        )
    return {name: len(load_benchmark(name)) for name in names}
