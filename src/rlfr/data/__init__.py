"""Problems and prompts: data files, dataset directories and Hub datasets (through ``datasets``), the benchmark
suite, the embedded procedural task, one resolver for all of them (``sources``), the prompt templates, and the
flow-pretraining data preparation (``prepare``)."""

from rlfr.data.benchmarks import BENCHMARKS, load_benchmark
from rlfr.data.examples import DataError, Example, Examples, Fields, LoadReport, load_examples
from rlfr.data.sources import load_source, render_prompts, resolve_data
from rlfr.data.tasks import (
    EMBEDDED_SETS,
    EMBEDDED_TASKS,
    embedded_set,
    embedded_task,
    multistep_task,
    transfer_task,
)
from rlfr.data.templates import TEMPLATES, render_prompt

__all__ = [
    "BENCHMARKS",
    "EMBEDDED_SETS",
    "EMBEDDED_TASKS",
    "TEMPLATES",
    "DataError",
    "Example",
    "Examples",
    "Fields",
    "LoadReport",
    "embedded_set",
    "embedded_task",
    "load_benchmark",
    "load_examples",
    "load_source",
    "multistep_task",
    "render_prompt",
    "render_prompts",
    "resolve_data",
    "transfer_task",
]
